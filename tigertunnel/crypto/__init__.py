"""Cryptographic building blocks.

Only the modules in this package touch primitive libraries (``cryptography``,
``kyber-py``, ``pyaegis``); everything else uses the functions defined here.
"""
