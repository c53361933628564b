"""The core's behaviour, written as plugins whose implementations are ``trylast``.

Any installed plugin that answers a firstresult hook replaces these. Module
import must stay cheap (no torch): heavy imports live inside the hooks.
"""
