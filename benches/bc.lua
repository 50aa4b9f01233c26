-- Rotates POSTs over devices 1..BC_DEVICES; BC_MODE = em (EM deviceUserQuery to
-- /emservice/EMServiceServlet) or northbound (POST /api/getloggedinuser/{device}).
local mode = os.getenv("BC_MODE") or "northbound"
local devices = tonumber(os.getenv("BC_DEVICES") or "1000")
local requests = {}
local index = 0
local function encode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
init = function(args)
  local creds = "<appID>bcapp</appID><appCertificate>bcsecret</appCertificate>"
  local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  for i = 1, devices do
    local device = string.format("SEP%012X", i)
    if mode == "em" then
      local xml = "<query><appInfo>" .. creds .. "</appInfo><deviceUserQuery><deviceName>"
        .. device .. "</deviceName></deviceUserQuery></query>"
      requests[i] = wrk.format("POST", "/emservice/EMServiceServlet", headers, "xml=" .. encode(xml))
    else
      requests[i] = wrk.format("POST", "/api/getloggedinuser/" .. device, headers,
        "xml=" .. encode("<request>" .. creds .. "</request>"))
    end
  end
end
request = function()
  index = index % devices + 1
  return requests[index]
end
