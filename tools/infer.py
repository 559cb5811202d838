#!/usr/bin/env python
"""Draw predictions on images (boxes and masks, or colour overlays); works on CPU.

    python tools/infer.py CONFIG CHECKPOINT IMAGE_OR_FOLDER [...] --out-dir outputs/
"""
from poolformer_mm.cli.infer import main
from poolformer_mm.utils.known_warnings import ignore_known_warnings

if __name__ == '__main__':
    ignore_known_warnings()
    main()
