"""The loop's rules and records: policies, the trigger, runs, decisions, exports, adapter
imports, the judge's numbers."""
