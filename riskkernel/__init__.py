"""riskkernel: hard spend caps for AI agent processes, with an honest ledger."""

__version__ = "0.1.0"
