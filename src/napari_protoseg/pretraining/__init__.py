"""Self-supervised pretraining on unlabelled EM: objectives (:mod:`.objectives`) and the run
(:mod:`.engine`); the encoder file format is :mod:`napari_protoseg.model.encoder`."""
