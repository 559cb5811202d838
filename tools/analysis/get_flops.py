#!/usr/bin/env python
"""Parameters and MACs of a config's detector / segmentor, of its backbone, or of a bare arch:
see ``python tools/analysis/get_flops.py --help``."""
from poolformer_mm.cli.get_flops import main
from poolformer_mm.utils.known_warnings import ignore_known_warnings

if __name__ == '__main__':
    ignore_known_warnings()
    main()
