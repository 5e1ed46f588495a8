//! qslicectl's client side of the admin API: connecting (several addresses, next on
//! failure), the bearer token, and rendering replies as tables or JSON.
