"""What every rlbus service shares: config, typed messages, codec, bus sockets, logging. Never imports torch or vLLM."""
