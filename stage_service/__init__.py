"""stage_service."""
