"""The run's stages, one module per state a worker acts on: train, evaluate, deploy, watch, export."""
