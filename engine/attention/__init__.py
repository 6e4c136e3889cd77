"""Attention over a flat batch of segments with a paged KV cache, behind one backend interface.

`types` holds the data both the model and the kernels read (`Segment`, `LayerCache`, `slot_ids`; a
leaf that imports only torch); `base` the backend interface; `reference` the plain-torch backend (the
oracle); `triton_backend` the Triton kernel's; `selection` picks one per device, once.
"""
