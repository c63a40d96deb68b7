//! Tests on real network namespaces, veth pairs, taps and tc filters. They need root and fail
//! (never skip) without it; every namespace they make is deleted when its guard drops.

mod errors;
mod fixture;
mod forward;
mod wiring;
