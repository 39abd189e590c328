"""The video DiT, time/parameterization conventions, classifier-free guidance and forward-mode AD helpers."""
