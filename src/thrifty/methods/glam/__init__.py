"""GLaM recipe (arXiv 2112.06905): sparse mixture-of-experts LM against matched dense baselines.

Entry point: :func:`thrifty.methods.glam.train.train` with a :class:`~thrifty.methods.glam.config.GlamConfig`.
"""
