-- The "equivalent work" nginx peer of benches/load/harness.py: what erpgate's stack does per
-- request, in nginx's Lua module (Debian nginx-extras / libnginx-mod-http-lua), called from
-- `access_by_lua_block { require("nginx_peer").access() }`:
--
--   * split the key id and the secret from `Authorization: token <id>:<secret>`;
--   * look the key id up in a table (id -> hex SHA-256 of the secret, written by the harness as
--     peer_keys.lua; decoded to 32 bytes once, at load, as erpgate decodes its config);
--   * SHA-256 the presented secret (LuaJIT FFI to libcrypto's one-shot SHA256(); Debian has no
--     lua-resty-string) and compare all 32 bytes without an early exit; an unknown key id is
--     hashed too and compared against a decoy (401 either way);
--   * the path rule: only /api/resource/ToDo (any method), /api/resource/Item (GET/HEAD) and
--     /api/method/frappe.client.get_list|get_count; 403 otherwise.
--
-- The per-client quota is nginx's own `limit_req` keyed by the key id, and the header swap is
-- `proxy_set_header` (both in the nginx config the harness writes).

local ffi = require "ffi"
local bit = require "bit"
local keys = require "peer_keys"

ffi.cdef [[
unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
]]
local crypto = ffi.load("libcrypto.so.3")

local sub, find = string.sub, string.find
local bor, bxor = bit.bor, bit.bxor
local ngx_var, ngx_exit = ngx.var, ngx.exit

local function unhex(hex)
  assert(#hex == 64, "a SHA-256 is 64 hex digits")
  local out = ffi.new("uint8_t[32]")
  for i = 0, 31 do
    out[i] = assert(tonumber(sub(hex, 2 * i + 1, 2 * i + 2), 16))
  end
  return out
end

local expected = {}
for id, hex in pairs(keys) do
  expected[id] = unhex(hex)
end
local decoy = unhex(string.rep("00", 32))

local digest = ffi.new("uint8_t[32]") -- one per worker: a worker runs one handler at a time

-- Allowed exact paths: true = any method, "read" = GET or HEAD only.
local exact = {
  ["/api/resource/ToDo"] = true,
  ["/api/resource/Item"] = "read",
  ["/api/method/frappe.client.get_list"] = true,
  ["/api/method/frappe.client.get_count"] = true,
}

local M = {}

-- SHA-256 of `s`, compared in constant time with the 32 bytes `want`.
function M.matches(s, want)
  crypto.SHA256(s, #s, digest)
  local diff = 0
  for i = 0, 31 do
    diff = bor(diff, bxor(digest[i], want[i]))
  end
  return diff == 0
end

function M.access()
  local h = ngx_var.http_authorization
  if not h or sub(h, 1, 6) ~= "token " then
    return ngx_exit(401)
  end
  local colon = find(h, ":", 7, true)
  if not colon then
    return ngx_exit(401)
  end
  local want = expected[sub(h, 7, colon - 1)]
  local ok = M.matches(sub(h, colon + 1), want or decoy)
  if not ok or not want then
    return ngx_exit(401)
  end

  local uri = ngx_var.uri
  local rule = exact[uri]
  if rule == true then
    return
  end
  if rule == "read" then
    local method = ngx_var.request_method
    if method == "GET" or method == "HEAD" then
      return
    end
    return ngx_exit(403)
  end
  if find(uri, "/api/resource/ToDo/", 1, true) == 1 then
    return
  end
  if find(uri, "/api/resource/Item/", 1, true) == 1 then
    local method = ngx_var.request_method
    if method == "GET" or method == "HEAD" then
      return
    end
  end
  return ngx_exit(403)
end

return M
