"""Verify or show token shards: same as the `pretrain-shards` command (see docs/DATA.md)."""
import sys
from pretrain.data.inspect import main
if __name__ == "__main__": sys.exit(main())
