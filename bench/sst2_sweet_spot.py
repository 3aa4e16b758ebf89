"""SST-2 sweet spot: search from the fine-tuned MiniLM and print the chosen point against PyTorch fp32 and
ONNX Runtime dynamic int8 of the same model, measured in one run.

    .venv/bin/python bench/sst2_sweet_spot.py --teacher runs/sst2-ft --out runs/sst2-search
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweet_spot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("../shared/data/sst2", "runs/sst2-ft", "runs/sst2-search",
                  {"speedup": 6.0, "compression": 15.0, "drop": 1.0}))
