"""Speculation: predict a layer's query ahead of time (`predictor`) and copy its likely pages
before it runs (`prefetcher`)."""
