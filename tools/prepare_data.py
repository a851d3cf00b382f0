"""Tokenize raw text into Megatron shards: same as the `pretrain-prep` command (see docs/DATA.md)."""
import sys
from pretrain.data.prep import main
if __name__ == "__main__": sys.exit(main())
