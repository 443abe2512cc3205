"""From payload to Record: rules, the validator twin, the batcher pipeline and durable-ack timeouts."""
