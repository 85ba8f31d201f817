//! palisade-agent.
