"""More than one gateway process or host (REDIS_URL): who owns each 2025-era session, the signed
internal hop that forwards a request to its owner, and WORKERS=N processes on one port.

hooks.py is all the transports see (cheap without REDIS_URL: one dictionary lookup per request);
node.py holds the instance, its ownership records and its internal listener; hop.py signs and
checks the hop; workers.py is the supervisor that runs WORKERS=N processes.
"""
