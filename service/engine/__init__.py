"""Engine control: vLLM replicas, adapter loading, swap and reconcile."""
