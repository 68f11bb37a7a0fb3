"""Analysis of a model's behaviour under caching: the feature-stability probe
(probe.py: feature similarity across steps, the amplification of cached-feature
errors through the deep stack). Layer: above sampling and the cache engine (it drives
a sampling run through the cache protocol), below the applications."""
