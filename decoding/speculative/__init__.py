"""Speculative decoding: one jitted loop (`loop`), one verifier (`verify`) with its acceptance
rules (`acceptance`), the drafter protocol (`protocol`) and the drafters, and the
`speculative` strategy (`strategy`)."""
