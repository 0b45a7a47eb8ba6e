"""Models stepped one frame at a time (`Stepper`), where they come from, and what they are fed.

Nothing here knows about calls, threads or the network: the engine above owns those.
"""
