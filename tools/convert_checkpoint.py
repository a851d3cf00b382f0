#!/usr/bin/env python
"""Thin wrapper: `pretrain-convert` (export-hf / import-hf / reshard). See docs/INTEROP.md."""
import sys

from pretrain.interop.cli import main

if __name__ == "__main__":
    sys.exit(main())
