import sys

from napari_protoseg.benchmark.command import main

sys.exit(main())
