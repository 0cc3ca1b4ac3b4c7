"""What quantization did to a model: ``report`` (``lowbit report``) and ``debug`` (``lowbit debug``)."""
