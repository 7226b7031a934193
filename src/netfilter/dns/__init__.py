"""The DNS front-end: a filtering forwarder (asyncio, UDP and TCP) over the engine."""
