"""Operations: health, readiness, sd_notify."""
