// The server's API as the page uses it. A server run with --api-token needs the token on every
// call-API request; the page takes it from its own address, /#token=..., which never reaches a server log.
const token = new URLSearchParams(location.hash.slice(1)).get("token");

export const hasToken = () => Boolean(token);

export function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(path, { ...options, headers });
}
