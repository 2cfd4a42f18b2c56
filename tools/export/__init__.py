"""``mmssl export``: a run's checkpoint consolidated (`run`) and written as the whole model plus one encoder per
tower (`model`: the whole-model format and `load_model`, which rebuilds any family without training code), or, with
``--format open_clip``, as an open_clip model directory (`open_clip`)."""
