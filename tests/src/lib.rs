//! Helpers shared by the lab tests (placeholder).
