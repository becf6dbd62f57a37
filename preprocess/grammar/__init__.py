"""What a response format may cost: static bounds on a schema (`limits`), and one compile
in a bounded child process (`sandbox`, `worker`) before the engine sees it."""
