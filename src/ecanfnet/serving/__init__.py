"""`ecanfnet serve`: an HTTP API and web page over a dynamically batched model."""
