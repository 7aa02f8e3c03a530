"""Proving a candidate: the gate, scoring, onnxruntime sessions, typed evidence and the promotion decision."""
