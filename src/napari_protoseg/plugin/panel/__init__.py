"""The protoseg panel (the only Qt code): a section per concern, one module each.

- :mod:`.widget`: :class:`ProtosegWidget`, the sections put together with what they share;
- :mod:`.classes`, :mod:`.annotate`, :mod:`.train` (with :mod:`.train_views`), :mod:`.predict`,
  :mod:`.review`, :mod:`.model`, :mod:`.project`: the sections;
- :mod:`.workers`: training, prediction and saving in thread workers, and GUI work in small steps;
- :mod:`.common`: the sections' base class and the fold-away frame.

The panel only converts between Qt controls, napari layers and the Qt-free workflow in
:mod:`napari_protoseg.plugin.session`; training and prediction run in napari thread workers so the
viewer never freezes.
"""

from napari_protoseg.plugin.panel.train import TRAIN_BUTTON_TEXT
from napari_protoseg.plugin.panel.widget import ProtosegWidget

__all__ = ["TRAIN_BUTTON_TEXT", "ProtosegWidget"]
