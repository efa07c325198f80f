"""Built-in experiments: `prefopt experiment NAME`."""
