"""The benchmark behind ``python -m acckv_triton.bench``; suites live in their own modules (``decode``, ...)."""
