#!/usr/bin/env python
"""Thin wrapper: `pretrain-inspect-ckpt` -- a checkpoint's step, layout, config and data, from its JSON
alone, and a check of its commit manifest. See docs/INTEROP.md."""
import sys

from pretrain.interop.inspect import main

if __name__ == "__main__":
    sys.exit(main())
