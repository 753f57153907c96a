"""Maintenance tools: knob_docs, record_fidelity (with record_oracle), same_artifacts, selfextract and
preview_check."""
