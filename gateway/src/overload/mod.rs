//! Overload protection: the load level, priority shedding, adaptive
//! concurrency and circuit breakers. The pipeline's admission phase asks
//! it whether a request may take upstream capacity, and the exit phase
//! feeds back how long the request took. Not built yet: today every
//! request is admitted and filters read load level 0 (see
//! docs/pipeline.md).
