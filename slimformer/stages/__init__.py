"""Stages: each a frozen config class plus a plain function ``(slim, task, config, ...) -> result``."""
