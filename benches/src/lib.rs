//! Shared helpers of the benchmark tools.
