"""Alarm rules as data and their one evaluator (ADR-0018); pure, shared by the rule workers and the dry run."""
