"""Engines: the one place that knows how tokens are produced.

`engine=<name>` names the module or package runner/engines/<name>, which declares what it can do
(`CAPABILITIES`, runner/engines/protocol.py's `Capabilities`) and builds the engine
(`build(cfg, setup)`, loading what it needs) as an object that follows protocol.py's `Engine`.
runner/engines/registry.py picks the engine and its batch size from the capabilities, or refuses
the config. A new engine is its module, its conf/engine/<name>.yaml and its `EngineKind` value;
nothing in the app changes.
"""
