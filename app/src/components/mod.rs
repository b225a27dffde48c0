//! Reusable pieces of the page chrome.

mod navbar;

pub use navbar::Navbar;
