// Reference server on uWebSockets (C++, one thread, one event loop), written
// for Switchboard's benchmarks against the library's own API: `uWS::App`,
// `.ws<PerSocketData>(pattern, behavior)` with an `upgrade` handler that
// keeps the `?id=` of the relay route in the socket's user data, its topics
// (`subscribe`, `App::publish`) for the relay, and `WebSocket::send` for echo.
//
// Endpoints (same wire format as the Rust reference servers):
//   GET /echo       echo every text and binary message unchanged
//   GET /ws?id=ID   relay: a text message {"targets":[ID,...],"payload":X}
//                   is delivered as the JSON text of X to every connection
//                   registered under each target id (ids are integers or
//                   strings; 5 and "5" are the same id)
//   GET /heartbeat  200, empty body; anything else 404
//
// Usage: ref-uwebsockets --listen 127.0.0.1:0 [--direct]
// Prints "listening on http://ADDR" once bound.
//
// Relay delivery: every relay connection subscribes to the topic named by its
// id, and a relay frame becomes one `App::publish` per target. uWebSockets
// buffers published messages and writes each subscriber's batch once per
// event-loop iteration (corked): the library's own way of sending to sockets
// other than the one being read. `--direct` instead keeps an id -> sockets
// map and calls `send` on each target; a socket that is not corked (only the
// one being read is) is written at once, one system call per delivery.
// Measured here (busy machine, relay 1,000 clients x 4 in flight, server
// pinned to one CPU): topics ~155k deliveries per server CPU-second, direct
// ~78k; fan-out to 2,000 ids about equal (~90-97k); an idle relay connection
// ~760 B of RSS with topics (its subscriber and topic), ~380 B direct. The
// benchmark runs the default (topics): the stronger relay reference.
//
// The relay frame is parsed by the hand parser below: it checks the JSON
// syntax of the whole frame (like serde_json in ref-fastwebsockets, which
// validates the raw payload it copies), decodes target ids, and keeps the
// payload as the bytes between its first and last character. A frame that is
// not such an object is ignored, as the other references do.
//
// Built by `switchboard-bench compare` from the uWebSockets and uSockets
// sources vendored in the crates.io package libuwebsockets-sys (see
// docs/benchmarks.md); not part of the cargo build.

#include "App.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

struct PerSocketData {
    // Relay connections: the id they are registered under (empty on /echo).
    std::string id;
};

using RelaySocket = uWS::WebSocket<false, true, PerSocketData>;

// Heterogeneous lookup, so a target id read from a frame is looked up as a
// string_view without building a std::string.
struct IdHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// id -> connections registered under it (the same id may be held by several).
std::unordered_map<std::string, std::vector<RelaySocket *>, IdHash, std::equal_to<>> peers;

bool pubsub = true;
uWS::App *app_ptr = nullptr;

// ---- a small JSON reader over one frame -----------------------------------

struct Reader {
    const char *p;
    const char *end;

    void ws() {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
            p++;
        }
    }

    bool eat(char c) {
        ws();
        if (p < end && *p == c) {
            p++;
            return true;
        }
        return false;
    }

    static int hex(char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    }

    // A string starting at `p` (on the quote). `plain` is set to the raw
    // contents when the string has no escape (no copy); otherwise, with
    // `out`, the decoded text is written there (\u as UTF-8).
    bool string(std::string *out, std::string_view *plain) {
        if (p >= end || *p != '"') return false;
        const char *start = ++p;
        bool escaped = false;
        while (p < end) {
            unsigned char c = (unsigned char) *p;
            if (c == '"') {
                if (plain && !escaped) *plain = std::string_view(start, (size_t) (p - start));
                p++;
                return true;
            }
            if (c < 0x20) return false;
            if (c != '\\') {
                // Copied only once an escape made the raw text unusable.
                if (out && escaped) out->push_back((char) c);
                p++;
                continue;
            }
            if (out && !escaped) out->append(start, (size_t) (p - start));
            escaped = true;
            if (++p >= end) return false;
            char e = *p++;
            char simple = 0;
            switch (e) {
                case '"': simple = '"'; break;
                case '\\': simple = '\\'; break;
                case '/': simple = '/'; break;
                case 'b': simple = '\b'; break;
                case 'f': simple = '\f'; break;
                case 'n': simple = '\n'; break;
                case 'r': simple = '\r'; break;
                case 't': simple = '\t'; break;
                case 'u': break;
                default: return false;
            }
            if (simple) {
                if (out) out->push_back(simple);
                continue;
            }
            if (end - p < 4) return false;
            unsigned cp = 0;
            for (int i = 0; i < 4; i++) {
                int h = hex(p[i]);
                if (h < 0) return false;
                cp = cp * 16 + (unsigned) h;
            }
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                unsigned lo = 0;
                bool ok = true;
                for (int i = 2; i < 6; i++) {
                    int h = hex(p[i]);
                    if (h < 0) ok = false;
                    lo = lo * 16 + (unsigned) (h < 0 ? 0 : h);
                }
                if (ok && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
            }
            if (out) {
                if (cp < 0x80) {
                    out->push_back((char) cp);
                } else if (cp < 0x800) {
                    out->push_back((char) (0xC0 | (cp >> 6)));
                    out->push_back((char) (0x80 | (cp & 0x3F)));
                } else if (cp < 0x10000) {
                    out->push_back((char) (0xE0 | (cp >> 12)));
                    out->push_back((char) (0x80 | ((cp >> 6) & 0x3F)));
                    out->push_back((char) (0x80 | (cp & 0x3F)));
                } else {
                    out->push_back((char) (0xF0 | (cp >> 18)));
                    out->push_back((char) (0x80 | ((cp >> 12) & 0x3F)));
                    out->push_back((char) (0x80 | ((cp >> 6) & 0x3F)));
                    out->push_back((char) (0x80 | (cp & 0x3F)));
                }
            }
        }
        return false;
    }

    // A JSON number as written (RFC 8259 grammar).
    bool number() {
        const char *start = p;
        if (p < end && *p == '-') p++;
        if (p >= end) return false;
        if (*p == '0') {
            p++;
        } else if (*p >= '1' && *p <= '9') {
            while (p < end && *p >= '0' && *p <= '9') p++;
        } else {
            return false;
        }
        if (p < end && *p == '.') {
            p++;
            const char *digits = p;
            while (p < end && *p >= '0' && *p <= '9') p++;
            if (p == digits) return false;
        }
        if (p < end && (*p == 'e' || *p == 'E')) {
            p++;
            if (p < end && (*p == '+' || *p == '-')) p++;
            const char *digits = p;
            while (p < end && *p >= '0' && *p <= '9') p++;
            if (p == digits) return false;
        }
        return p > start;
    }

    bool literal(const char *word) {
        size_t n = strlen(word);
        if ((size_t) (end - p) < n || memcmp(p, word, n) != 0) return false;
        p += n;
        return true;
    }

    // Any JSON value, checked and skipped (depth-limited).
    bool value(int depth = 0) {
        if (depth > 128) return false;
        ws();
        if (p >= end) return false;
        switch (*p) {
            case '"': return string(nullptr, nullptr);
            case '{': {
                p++;
                if (eat('}')) return true;
                do {
                    ws();
                    if (!string(nullptr, nullptr) || !eat(':') || !value(depth + 1)) return false;
                } while (eat(','));
                return eat('}');
            }
            case '[': {
                p++;
                if (eat(']')) return true;
                do {
                    if (!value(depth + 1)) return false;
                } while (eat(','));
                return eat(']');
            }
            case 't': return literal("true");
            case 'f': return literal("false");
            case 'n': return literal("null");
            default: return number();
        }
    }
};

// The parts of a relay frame: target ids (strings decoded, numbers as
// written) and the payload's JSON text.
struct RelayFrame {
    std::vector<std::string_view> targets;
    std::string_view payload;
    bool has_payload = false;
    // Decoded ids of targets written with escapes (rare); `targets` points
    // into them, and a deque never moves its elements when it grows.
    std::deque<std::string> decoded;
};

bool parse_relay(std::string_view text, RelayFrame &frame) {
    Reader r{text.data(), text.data() + text.size()};
    bool has_targets = false;
    if (!r.eat('{')) return false;
    if (!r.eat('}')) {
        do {
            r.ws();
            std::string_view key;
            std::string escaped_key;
            if (!r.string(&escaped_key, &key) || !r.eat(':')) return false;
            if (key.data() == nullptr) key = escaped_key;
            if (key == "targets") {
                frame.targets.clear();
                frame.decoded.clear();
                if (!r.eat('[')) return false;
                has_targets = true;
                if (!r.eat(']')) {
                    do {
                        r.ws();
                        if (r.p < r.end && *r.p == '"') {
                            std::string_view plain;
                            std::string decoded;
                            if (!r.string(&decoded, &plain)) return false;
                            if (plain.data() != nullptr) {
                                frame.targets.push_back(plain);
                            } else {
                                frame.decoded.push_back(std::move(decoded));
                                frame.targets.push_back(frame.decoded.back());
                            }
                        } else {
                            const char *start = r.p;
                            if (!r.value()) return false;
                            frame.targets.push_back(std::string_view(start, (size_t) (r.p - start)));
                        }
                    } while (r.eat(','));
                    if (!r.eat(']')) return false;
                }
            } else if (key == "payload") {
                r.ws();
                const char *start = r.p;
                if (!r.value()) return false;
                frame.payload = std::string_view(start, (size_t) (r.p - start));
                frame.has_payload = true;
            } else if (!r.value()) {
                return false;
            }
        } while (r.eat(','));
        if (!r.eat('}')) return false;
    }
    r.ws();
    return r.p == r.end && has_targets && frame.has_payload;
}

// ---- relay ---------------------------------------------------------------

void deliver(const RelayFrame &frame) {
    for (std::string_view id : frame.targets) {
        if (pubsub) {
            // Topic = id. The App's publish (not the socket's) so that a
            // sender targeting its own id receives the message too, as with
            // the direct sends.
            app_ptr->publish(id, frame.payload, uWS::OpCode::TEXT);
            continue;
        }
        auto it = peers.find(id);
        if (it == peers.end()) continue;
        for (RelaySocket *ws : it->second) {
            ws->send(frame.payload, uWS::OpCode::TEXT);
        }
    }
}

void unregister(RelaySocket *ws) {
    auto it = peers.find(std::string_view(ws->getUserData()->id));
    if (it == peers.end()) return;
    auto &list = it->second;
    for (size_t i = 0; i < list.size(); i++) {
        if (list[i] == ws) {
            list[i] = list.back();
            list.pop_back();
            break;
        }
    }
    if (list.empty()) peers.erase(it);
}

struct Listen {
    std::string host = "127.0.0.1";
    int port = 8080;
};

bool parse_listen(const char *arg, Listen &out) {
    std::string s(arg);
    size_t colon = s.rfind(':');
    if (colon == std::string::npos) return false;
    std::string host = s.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    char *endp = nullptr;
    long port = strtol(s.c_str() + colon + 1, &endp, 10);
    if (*endp != '\0' || port < 0 || port > 65535) return false;
    out.host = host;
    out.port = (int) port;
    return true;
}

}  // namespace

int main(int argc, char **argv) {
    Listen listen;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *value = nullptr;
        if (strcmp(a, "--listen") == 0 && i + 1 < argc) {
            value = argv[++i];
        } else if (strncmp(a, "--listen=", 9) == 0) {
            value = a + 9;
        } else if (strcmp(a, "--direct") == 0) {
            pubsub = false;
            continue;
        } else {
            fprintf(stderr, "unknown argument %s (usage: ref-uwebsockets --listen HOST:PORT [--direct])\n", a);
            return 2;
        }
        if (!parse_listen(value, listen)) {
            fprintf(stderr, "--listen %s: expected HOST:PORT, e.g. 127.0.0.1:0\n", value);
            return 2;
        }
    }

    // The other references neither time out idle connections nor drop
    // messages to slow readers, and accept large frames (a relay frame to
    // 10,000 targets is ~60 KB): so no idle timeout, no backpressure limit
    // (0 = unlimited; the default 64 KiB drops sends), 16 MiB frames.
    uWS::App::WebSocketBehavior<PerSocketData> echo{};
    echo.maxPayloadLength = 16 * 1024 * 1024;
    echo.idleTimeout = 0;
    echo.maxBackpressure = 0;
    echo.sendPingsAutomatically = false;
    echo.message = [](auto *ws, std::string_view message, uWS::OpCode op) {
        if (op == uWS::OpCode::TEXT || op == uWS::OpCode::BINARY) ws->send(message, op);
    };

    uWS::App::WebSocketBehavior<PerSocketData> relay{};
    relay.maxPayloadLength = 16 * 1024 * 1024;
    relay.idleTimeout = 0;
    relay.maxBackpressure = 0;
    relay.sendPingsAutomatically = false;
    relay.upgrade = [](auto *res, auto *req, auto *context) {
        std::string_view id = req->getQuery("id");
        if (id.empty()) {
            res->writeStatus("404 Not Found")->end();
            return;
        }
        res->template upgrade<PerSocketData>(PerSocketData{std::string(id)}, req->getHeader("sec-websocket-key"),
                                             req->getHeader("sec-websocket-protocol"),
                                             req->getHeader("sec-websocket-extensions"), context);
    };
    relay.open = [](auto *ws) {
        const std::string &id = ws->getUserData()->id;
        if (pubsub) {
            ws->subscribe(id);
        } else {
            peers[id].push_back(ws);
        }
    };
    relay.message = [](auto *, std::string_view message, uWS::OpCode op) {
        if (op != uWS::OpCode::TEXT) return;
        static RelayFrame frame;
        frame.targets.clear();
        frame.decoded.clear();
        frame.has_payload = false;
        if (parse_relay(message, frame)) deliver(frame);
    };
    relay.close = [](auto *ws, int, std::string_view) {
        if (!pubsub) unregister(ws);
    };

    uWS::App app;
    app_ptr = &app;
    app.ws<PerSocketData>("/echo", std::move(echo))
        .ws<PerSocketData>("/ws", std::move(relay))
        .get("/heartbeat", [](auto *res, auto *) { res->end(); })
        .any("/*", [](auto *res, auto *) { res->writeStatus("404 Not Found")->end(); })
        .listen(listen.host, listen.port, [&](us_listen_socket_t *socket) {
            if (!socket) {
                fprintf(stderr, "cannot listen on %s:%d\n", listen.host.c_str(), listen.port);
                exit(1);
            }
            int port = us_socket_local_port(0, (us_socket_t *) socket);
            bool v6 = listen.host.find(':') != std::string::npos;
            printf("listening on http://%s%s%s:%d\n", v6 ? "[" : "", listen.host.c_str(), v6 ? "]" : "", port);
            fflush(stdout);
        });
    app.run();
    return 0;
}
