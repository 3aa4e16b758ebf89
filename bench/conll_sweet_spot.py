"""CoNLL-2003 sweet spot (NER twin of sst2_sweet_spot.py): quality is entity F1 on the test file.

    .venv/bin/python bench/conll_sweet_spot.py --teacher runs/conll-ft --out runs/conll-search
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweet_spot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("../shared/data/conll2003", "runs/conll-ft", "runs/conll-search",
                  {"speedup": 4.0, "compression": 1.0, "drop": 1.0}))
