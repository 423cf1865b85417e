"""Flower glue. ServerApp side: job.py (one run), coordinator.py (the visit loop), membership.py
(who takes part, W, drops and rejoins), checkpoints.py, transport.py (send and pull), fedavg.py.
ClientApp side: handlers.py (the gossip mod and one handler per message), state.py (a node
between messages), fedavg_client.py. supernode.py is `deca-flower-supernode`; loopback.py starts
a local federation. Flower's non-public API is reached only through internals/."""
