package main

// The front http.Handler: one access-log line per request, GET /health, the bearer check and the in-flight
// limit (both before any body is read), the body limit, and the JSON normalisation that lets OpenAI-shaped
// bodies reach grpc-gateway (which then decodes them into the protos).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// requestState travels in the request's context from the front handler to the forwarders and error writers.
type requestState struct {
	stream      bool              // answered as server-sent events
	usageChunk  bool              // a stream with stream_options.include_usage: chunks carry "usage" (null until the last)
	base64      bool              // embeddings: the client asked for encoding_format "base64"
	renames     map[string]string // proto field -> the JSON field the client used (prompts -> prompt)
	trailer     metadata.MD       // trailing metadata of a failed gRPC stream (captureStreamTrailers)
	streamError string            // gRPC code of an error that ended a stream after its 200
	requestID   string            // the gateway's x-request-id, for the access log
}

type stateKey struct{}

func stateFrom(ctx context.Context) *requestState {
	if s, ok := ctx.Value(stateKey{}).(*requestState); ok {
		return s
	}
	return &requestState{}
}

type frontHandler struct {
	mux          *runtime.ServeMux
	conn         *grpc.ClientConn
	maxBody      int64
	gateway      string
	inFlight     inFlight      // requests being served (nil: no limit)
	writeTimeout time.Duration // per write: each Write/Flush moves the connection's write deadline (0: none)
}

func (h *frontHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	started := time.Now()
	state := &requestState{}
	rec := &recorder{ResponseWriter: w, status: http.StatusOK, conn: connFrom(r.Context()), writeTimeout: h.writeTimeout}
	rec.extendWriteDeadline()
	path := r.URL.EscapedPath()
	defer func() {
		// One line per request; never bodies, never headers (the Authorization header holds the key).
		line := fmt.Sprintf("%s %s %s %d %.1fms", timestamp(), r.Method, path, rec.status,
			float64(time.Since(started).Microseconds())/1000)
		if state.stream {
			line += " stream"
		}
		if state.streamError != "" {
			line += " stream_error=" + state.streamError
		}
		if state.requestID != "" {
			line += " request_id=" + state.requestID
		}
		accessLog.Print(line)
	}()
	r = r.WithContext(context.WithValue(r.Context(), stateKey{}, state))

	if r.URL.Path == "/health" { // not counted against the limit: probes answer while the sidecar is full
		h.health(rec, r)
		return
	}
	if r.URL.Path == "/openapi.json" { // public, like /health: a static document
		serveOpenAPI(rec, r)
		return
	}
	// Cheap refusals first, before any body is read: no bearer token (the gateway still checks the key itself),
	// then no free slot.
	if (r.URL.Path == "/v1" || strings.HasPrefix(r.URL.Path, "/v1/") || r.URL.Path == "/tokenize" ||
		r.URL.Path == "/detokenize") && !hasBearerToken(r) {
		rec.Header().Set("WWW-Authenticate", `Bearer realm="llmserve"`)
		refuseUnread(rec, r, http.StatusUnauthorized, "You didn't provide an API key: send it in one "+
			"`Authorization: Bearer <key>` header.", "missing_api_key")
		return
	}
	if !h.inFlight.tryAcquire() {
		rec.Header().Set("Retry-After", "1")
		refuseUnread(rec, r, http.StatusServiceUnavailable, fmt.Sprintf("the REST sidecar is serving its maximum "+
			"of %d concurrent requests; retry shortly", cap(h.inFlight)), "server_overloaded")
		return
	}
	defer h.inFlight.release()

	switch {
	case r.Method == http.MethodPost:
		if !h.prepareBody(rec, r, state) {
			return
		}
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v1/models/") &&
		len(r.URL.Path) > len("/v1/models/") && !strings.Contains(r.URL.Path[len("/v1/models/"):], "/"):
		h.retrieveModel(rec, r, r.URL.Path[len("/v1/models/"):])
		return
	}
	h.mux.ServeHTTP(rec, r)
}

// health answers 200 when the gateway's gRPC health service says the InferenceService is SERVING, else 503.
func (h *frontHandler) health(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeOpenAIError(w, r, http.StatusMethodNotAllowed, "method "+r.Method+" is not allowed on /health; use GET",
			"", "method_not_allowed")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	res, err := grpc_health_v1.NewHealthClient(h.conn).Check(ctx,
		&grpc_health_v1.HealthCheckRequest{Service: inferenceService})
	var body map[string]interface{}
	code := http.StatusOK
	switch {
	case err != nil:
		code = http.StatusServiceUnavailable
		body = map[string]interface{}{"status": "unavailable", "gateway": h.gateway,
			"message": "the gateway's health check failed: " + status.Convert(err).Message()}
	case res.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING:
		code = http.StatusServiceUnavailable
		body = map[string]interface{}{"status": "unavailable", "gateway": h.gateway,
			"message": "the gateway reports " + res.GetStatus().String()}
	default:
		body = map[string]interface{}{"status": "ok", "gateway": h.gateway}
	}
	buf, _ := json.Marshal(body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	if r.Method != http.MethodHead {
		w.Write(append(buf, '\n'))
	}
}

// prepareBody reads the POST body (at most maxBody bytes), checks and normalises it, and replaces it (and the
// path, for "stream": true) on r. It answers the request itself and returns false when the body is refused.
func (h *frontHandler) prepareBody(w http.ResponseWriter, r *http.Request, state *requestState) bool {
	tooLarge := func() bool {
		// Read (a bounded amount of) what the client is still sending: closing a connection with unread data
		// resets it, and the client may then never see this 413. A client that waits for 100-continue has
		// sent nothing yet and gets the answer at once.
		if !strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
			io.CopyN(io.Discard, r.Body, drainLimit)
		}
		writeOpenAIError(w, r, http.StatusRequestEntityTooLarge,
			fmt.Sprintf("the request body is larger than %d bytes (the sidecar's --max-body-bytes)", h.maxBody),
			"", "request_too_large")
		return false
	}
	if r.ContentLength > h.maxBody {
		return tooLarge()
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, h.maxBody+1))
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() { // the body did not arrive within --read-timeout
		w.Header().Set("Connection", "close")
		writeOpenAIError(w, r, http.StatusRequestTimeout, "the request body did not arrive within the sidecar's "+
			"read timeout", "", "request_timeout")
		return false
	}
	if err != nil {
		writeOpenAIError(w, r, http.StatusBadRequest, "could not read the request body: "+err.Error(), "", "invalid_body")
		return false
	}
	if int64(len(raw)) > h.maxBody {
		return tooLarge()
	}
	kind := endpointKind(r.URL.Path)
	if kind == "" { // not a body we know: the mux answers (404/405) without reading it
		r.Body = io.NopCloser(bytes.NewReader(raw))
		return true
	}
	body, perr := normalize(kind, r.URL.Path, raw, state)
	if perr != nil {
		writeOpenAIError(w, r, http.StatusBadRequest, perr.message, perr.param, perr.code)
		return false
	}
	if state.stream && !strings.HasSuffix(r.URL.Path, ":stream") {
		r.URL.Path += ":stream"
		r.URL.RawPath = ""
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Del("Content-Encoding")
	return true
}

// hasBearerToken: exactly one Authorization header, scheme Bearer (any case), and a token without blanks.
// Only the shape is checked here; the gateway checks the key.
func hasBearerToken(r *http.Request) bool {
	values := r.Header.Values("Authorization")
	if len(values) != 1 {
		return false
	}
	v := values[0]
	if len(v) <= len("Bearer ") || !strings.EqualFold(v[:len("Bearer ")], "Bearer ") {
		return false
	}
	token := strings.TrimSpace(v[len("Bearer "):])
	return token != "" && !strings.ContainsAny(token, " \t")
}

// refuseUnread answers without reading the body. With a body on the way the connection closes after the answer
// (net/http would otherwise read up to 256 KiB of it before answering, and then nobody knows where the next
// request starts).
func refuseUnread(w http.ResponseWriter, r *http.Request, httpStatus int, message, code string) {
	if r.ContentLength != 0 {
		w.Header().Set("Connection", "close")
	}
	writeOpenAIError(w, r, httpStatus, message, "", code)
}

// drainLimit bounds how much of an oversized body is read and discarded before the 413.
const drainLimit = 64 << 20

// endpointKind tells which request shape a POST path carries ("" for paths the mux does not serve by POST).
func endpointKind(path string) string {
	switch strings.TrimSuffix(path, ":stream") {
	case "/v1/completions":
		return "completions"
	case "/v1/chat/completions", "/v1/chat":
		return "chat"
	case "/v1/embeddings":
		if strings.HasSuffix(path, ":stream") {
			return ""
		}
		return "embeddings"
	case "/tokenize", "/v1/tokenize":
		if strings.HasSuffix(path, ":stream") {
			return ""
		}
		return "tokenize"
	case "/detokenize", "/v1/detokenize":
		if strings.HasSuffix(path, ":stream") {
			return ""
		}
		return "detokenize"
	}
	return ""
}

// ---- JSON normalisation ----

type fieldKind int

const (
	kindString fieldKind = iota
	kindInt32
	kindInt64
	kindNumber
	kindBool
	kindStrings  // list of strings
	kindStop     // null, a string or a list of strings
	kindPriority // enum: a name or a number
	kindObject
	kindInt32s    // list of integers (token ids)
	kindLogitBias // object: token id (a decimal string) -> number
)

var generationFields = map[string]fieldKind{
	"model": kindString, "max_tokens": kindInt32, "max_completion_tokens": kindInt32, "temperature": kindNumber,
	"top_p": kindNumber, "top_k": kindInt32, "seed": kindInt64, "stop": kindStop, "n": kindInt32,
	"user": kindString, "priority": kindPriority, "skip_cache": kindBool, "ignore_eos": kindBool,
	"stream": kindBool, "stream_options": kindObject,
	"presence_penalty": kindNumber, "frequency_penalty": kindNumber, "repetition_penalty": kindNumber,
	"logit_bias": kindLogitBias, "min_tokens": kindInt32, "stop_token_ids": kindInt32s,
	"response_format": kindObject, "structured_outputs": kindObject,
}

var fieldsByKind = map[string]map[string]fieldKind{
	"completions": merge(generationFields, map[string]fieldKind{"prompts": kindStrings, "logprobs": kindInt32,
		"echo": kindBool}),
	"chat": merge(generationFields, map[string]fieldKind{"logprobs": kindBool, "top_logprobs": kindInt32,
		"add_generation_prompt": kindBool, "continue_final_message": kindBool, "parallel_tool_calls": kindBool}),
	"embeddings": {"model": kindString, "inputs": kindStrings, "encoding_format": kindString, "user": kindString,
		"priority": kindPriority, "skip_cache": kindBool, "dimensions": kindInt32},
	"tokenize": {"model": kindString, "prompt": kindString, "add_generation_prompt": kindBool,
		"continue_final_message": kindBool, "return_token_strs": kindBool},
	"detokenize": {"model": kindString, "tokens": kindInt32s},
}

func merge(a, b map[string]fieldKind) map[string]fieldKind {
	out := map[string]fieldKind{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

type bodyError struct {
	message, param, code string
}

func invalidType(field, expected string, value interface{}) *bodyError {
	return &bodyError{
		message: fmt.Sprintf("Invalid type for '%s': expected %s, but got %s instead.", field, expected, describe(value)),
		param:   field, code: "invalid_type"}
}

func invalidValue(field, message string) *bodyError {
	return &bodyError{message: message, param: field, code: "invalid_value"}
}

func describe(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case json.Number:
		if _, err := strconv.ParseInt(string(x), 10, 64); err == nil {
			return "an integer"
		}
		return "a number (" + string(x) + ")"
	case bool:
		return "a boolean"
	case []interface{}:
		return "an array"
	case map[string]interface{}:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

// normalize checks an OpenAI-shaped request body and rewrites it into the JSON of the proto request:
// nulls dropped, `prompt`/`input` lists moved to `prompts`/`inputs`, a string `stop` made a list, chat content
// parts joined, `stream` resolved to the streaming binding (with include_usage false unless stream_options
// asks for it), base64 embeddings requested as floats (the response is encoded back). Unknown fields stay:
// the gateway's decoder ignores them.
func normalize(kind, path string, raw []byte, state *requestState) ([]byte, *bodyError) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return nil, &bodyError{message: "the request body is empty; send a JSON object", code: "invalid_json"}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var parsed interface{}
	if err := dec.Decode(&parsed); err != nil {
		return nil, &bodyError{message: "could not parse the JSON body of the request: " + jsonErrorText(err, raw),
			code: "invalid_json"}
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &bodyError{message: "could not parse the JSON body of the request: unexpected data after the " +
			"JSON object", code: "invalid_json"}
	}
	body, ok := parsed.(map[string]interface{})
	if !ok {
		return nil, &bodyError{message: "the request body must be a JSON object, not " + describe(parsed),
			code: "invalid_json"}
	}
	for k, v := range body {
		if v == nil { // OpenAI clients send explicit nulls for "not given" (stop: null, user: null, ...)
			delete(body, k)
		}
	}
	state.renames = map[string]string{}

	// Shapes that need more than a type check.
	switch kind {
	case "completions":
		if err := moveTokenPrompts(body, state); err != nil {
			return nil, err
		}
		if err := moveList(body, "prompt", "prompts", state, "prompt"); err != nil {
			return nil, err
		}
	case "embeddings":
		if err := moveTokenInputs(body, state); err != nil {
			return nil, err
		}
		if err := moveList(body, "input", "inputs", state, "input"); err != nil {
			return nil, err
		}
		if f, ok := body["encoding_format"].(string); ok {
			switch f {
			case "base64":
				state.base64 = true
				body["encoding_format"] = "float"
			case "float":
			default:
				return nil, invalidValue("encoding_format",
					fmt.Sprintf("encoding_format=%q is not supported; use \"float\" or \"base64\"", f))
			}
		}
	case "chat", "tokenize":
		if err := normalizeMessages(body); err != nil {
			return nil, err
		}
		if err := normalizeTools(body); err != nil { // tools.go (Tokenize counts a chat request's tools too)
			return nil, err
		}
	}
	if kind == "completions" || kind == "chat" {
		if err := normalizeStructured(body); err != nil {
			return nil, err
		}
	}
	if s, ok := body["stop"].(string); ok {
		body["stop"] = []interface{}{s}
	}

	for name, fk := range fieldsByKind[kind] {
		v, present := body[name]
		if !present {
			continue
		}
		fixed, err := checkField(name, fk, v)
		if err != nil {
			return nil, err
		}
		body[name] = fixed
	}

	if kind == "completions" || kind == "chat" {
		stream, _ := body["stream"].(bool)
		delete(body, "stream")
		state.stream = stream || strings.HasSuffix(path, ":stream")
		if state.stream {
			opts, _ := body["stream_options"].(map[string]interface{})
			include := false
			if opts != nil {
				switch v := opts["include_usage"].(type) {
				case bool:
					include = v
				case nil:
				default:
					return nil, invalidType("stream_options.include_usage", "a boolean", v)
				}
			}
			// Without stream_options the gateway would end with a usage chunk that has no choices; OpenAI (and
			// so the SDK) sends one only when include_usage is true.
			body["stream_options"] = map[string]interface{}{"include_usage": include}
			state.usageChunk = include
		} else {
			delete(body, "stream_options") // only streams have it
		}
	}
	out, err := json.Marshal(body)
	if err != nil {
		return nil, &bodyError{message: "could not re-encode the request: " + err.Error(), code: "invalid_json"}
	}
	return out, nil
}

func jsonErrorText(err error, raw []byte) string {
	var syntax *json.SyntaxError
	if errors.As(err, &syntax) {
		return fmt.Sprintf("%s (at byte %d)", syntax.Error(), syntax.Offset)
	}
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		return "unexpected end of the JSON input"
	}
	return err.Error()
}

// moveList accepts `name` as a string or a list of strings; a list goes to the proto's `listName` field.
func moveList(body map[string]interface{}, name, listName string, state *requestState, shown string) *bodyError {
	v, ok := body[name]
	if !ok {
		return nil
	}
	switch x := v.(type) {
	case string:
		return nil
	case []interface{}:
		for i, item := range x {
			switch item.(type) {
			case string:
			case json.Number, []interface{}:
				return &bodyError{message: fmt.Sprintf("%s as token ids is not supported; send text (a string or a "+
					"list of strings)", name), param: name, code: "unsupported_value"}
			default:
				return invalidType(fmt.Sprintf("%s[%d]", name, i), "a string", item)
			}
		}
		if _, both := body[listName]; both {
			return invalidValue(name, fmt.Sprintf("set either %s or %s, not both", name, listName))
		}
		delete(body, name)
		body[listName] = x
		state.renames[listName] = shown
		return nil
	}
	return invalidType(name, "a string or an array of strings", v)
}

// moveTokenPrompts moves a completions `prompt` of token ids (a list of integers, or a list of such lists, as
// OpenAI accepts) to the proto's prompt_token_ids; a prompt of text is left to moveList.
func moveTokenPrompts(body map[string]interface{}, state *requestState) *bodyError {
	ids := func(field string, items []interface{}) ([]interface{}, *bodyError) {
		out := make([]interface{}, len(items))
		for i, item := range items {
			fixed, err := checkField(fmt.Sprintf("%s[%d]", field, i), kindInt32, item)
			if err != nil {
				return nil, err
			}
			out[i] = fixed
		}
		return out, nil
	}
	if err := checkTokenIDEntries(body, "prompt_token_ids"); err != nil {
		return err
	}
	list, ok := body["prompt"].([]interface{})
	if !ok || len(list) == 0 {
		return nil
	}
	var prompts []interface{}
	switch list[0].(type) {
	case json.Number: // one prompt
		one, err := ids("prompt", list)
		if err != nil {
			return err
		}
		prompts = []interface{}{map[string]interface{}{"token_ids": one}}
		state.renames["prompt_token_ids[0]"] = "prompt"
	case []interface{}: // a batch of prompts
		for i, item := range list {
			inner, ok := item.([]interface{})
			if !ok {
				return invalidType(fmt.Sprintf("prompt[%d]", i), "an array of token ids", item)
			}
			one, err := ids(fmt.Sprintf("prompt[%d]", i), inner)
			if err != nil {
				return err
			}
			prompts = append(prompts, map[string]interface{}{"token_ids": one})
		}
		state.renames["prompt_token_ids"] = "prompt"
	default:
		return nil
	}
	if _, both := body["prompt_token_ids"]; both {
		return invalidValue("prompt", "set either prompt or prompt_token_ids, not both")
	}
	delete(body, "prompt")
	body["prompt_token_ids"] = prompts
	return nil
}

// checkTokenIDEntries type-checks a body that names the proto's own list of {token_ids} (prompt_token_ids,
// input_token_ids): integers, as the decoder takes them (0.0 is sent as 0, 1.5 refused naming the field).
func checkTokenIDEntries(body map[string]interface{}, name string) *bodyError {
	given, present := body[name]
	if !present {
		return nil
	}
	entries, ok := given.([]interface{})
	if !ok {
		return invalidType(name, "an array of {token_ids}", given)
	}
	for i, e := range entries {
		field := fmt.Sprintf("%s[%d]", name, i)
		entry, ok := e.(map[string]interface{})
		if !ok {
			return invalidType(field, "an object with token_ids", e)
		}
		if v, present := entry["token_ids"]; present && v != nil {
			fixed, err := checkField(field+".token_ids", kindInt32s, v)
			if err != nil {
				return err
			}
			entry["token_ids"] = fixed
		}
	}
	return nil
}

// moveTokenInputs moves an embeddings `input` of token ids (a list of integers, or a list of such lists, as OpenAI
// accepts) to the proto's input_token_ids; an input of text is left to moveList.
func moveTokenInputs(body map[string]interface{}, state *requestState) *bodyError {
	if err := checkTokenIDEntries(body, "input_token_ids"); err != nil {
		return err
	}
	list, ok := body["input"].([]interface{})
	if !ok || len(list) == 0 {
		return nil
	}
	var inputs []interface{}
	switch list[0].(type) {
	case json.Number: // one input
		ids, err := checkField("input", kindInt32s, list)
		if err != nil {
			return err
		}
		inputs = []interface{}{map[string]interface{}{"token_ids": ids}}
		state.renames["input_token_ids[0]"] = "input"
	case []interface{}: // a batch of inputs
		for i, item := range list {
			ids, err := checkField(fmt.Sprintf("input[%d]", i), kindInt32s, item)
			if err != nil {
				return err
			}
			inputs = append(inputs, map[string]interface{}{"token_ids": ids})
		}
		state.renames["input_token_ids"] = "input"
	default:
		return nil
	}
	if _, both := body["input_token_ids"]; both {
		return invalidValue("input", "set either input or input_token_ids, not both")
	}
	delete(body, "input")
	body["input_token_ids"] = inputs
	return nil
}

// normalizeMessages checks chat messages and flattens OpenAI content parts into the proto's single string.
func normalizeMessages(body map[string]interface{}) *bodyError {
	v, ok := body["messages"]
	if !ok {
		return nil
	}
	list, ok := v.([]interface{})
	if !ok {
		return invalidType("messages", "an array of messages", v)
	}
	for i, item := range list {
		field := fmt.Sprintf("messages[%d]", i)
		m, ok := item.(map[string]interface{})
		if !ok {
			return invalidType(field, "an object with role and content", item)
		}
		switch role := m["role"].(type) {
		case string:
			if role == "developer" { // OpenAI's newer name for the system role
				m["role"] = "system"
			}
		case nil:
		default:
			return invalidType(field+".role", "a string", role)
		}
		switch name := m["name"].(type) {
		case string:
		case nil:
			delete(m, "name")
		default:
			return invalidType(field+".name", "a string", name)
		}
		if err := normalizeToolFields(m, field); err != nil { // tools.go
			return err
		}
		switch content := m["content"].(type) {
		case string:
		case nil:
			m["content"] = ""
		case []interface{}:
			texts := make([]string, 0, len(content))
			for j, part := range content {
				p, ok := part.(map[string]interface{})
				if !ok {
					return invalidType(fmt.Sprintf("%s.content[%d]", field, j), "a content part object", part)
				}
				if t, _ := p["type"].(string); t != "text" {
					shown := describe(p["type"]) // a part without a type: "null", not Go's "<nil>"
					if s, ok := p["type"].(string); ok {
						shown = strconv.Quote(s)
					}
					return &bodyError{message: fmt.Sprintf("%s.content[%d]: content parts of type %s are not "+
						"supported; only \"text\"", field, j, shown), param: field + ".content",
						code: "unsupported_value"}
				}
				text, ok := p["text"].(string)
				if !ok {
					return invalidType(fmt.Sprintf("%s.content[%d].text", field, j), "a string", p["text"])
				}
				texts = append(texts, text)
			}
			m["content"] = strings.Join(texts, "\n")
		default:
			return invalidType(field+".content", "a string or an array of content parts", content)
		}
	}
	return nil
}

// normalizeStructured takes the shapes of a decoding constraint that OpenAI's and vLLM's clients send: a JSON
// Schema given as JSON text (response_format.json_schema.schema, structured_outputs.json) becomes the object the
// proto's Struct takes, nulls inside are dropped, and vLLM's older guided_json / guided_regex / guided_choice /
// guided_grammar move into structured_outputs. The gateway validates and compiles what results.
func normalizeStructured(body map[string]interface{}) *bodyError {
	for _, legacy := range [][2]string{{"guided_json", "json"}, {"guided_regex", "regex"},
		{"guided_choice", "choice"}, {"guided_grammar", "grammar"}} {
		v, ok := body[legacy[0]]
		if !ok {
			continue
		}
		delete(body, legacy[0])
		if _, given := body["structured_outputs"]; !given {
			body["structured_outputs"] = map[string]interface{}{}
		}
		so, ok := body["structured_outputs"].(map[string]interface{})
		if !ok {
			return invalidType("structured_outputs", "an object", body["structured_outputs"])
		}
		if _, dup := so[legacy[1]]; dup {
			return invalidValue(legacy[0], fmt.Sprintf("%s and structured_outputs.%s are both set: send one of them",
				legacy[0], legacy[1]))
		}
		so[legacy[1]] = v
	}
	if rf, ok := body["response_format"].(map[string]interface{}); ok {
		dropNulls(rf)
		if js, ok := rf["json_schema"].(map[string]interface{}); ok {
			dropNulls(js)
			if err := schemaObject(js, "schema", "response_format.json_schema.schema"); err != nil {
				return err
			}
		}
	}
	if so, ok := body["structured_outputs"].(map[string]interface{}); ok {
		dropNulls(so)
		if err := schemaObject(so, "json", "structured_outputs.json"); err != nil {
			return err
		}
	}
	return nil
}

func dropNulls(m map[string]interface{}) {
	for k, v := range m {
		if v == nil {
			delete(m, k)
		}
	}
}

// schemaObject makes parent[key] a JSON object: as given, or parsed from JSON text.
func schemaObject(parent map[string]interface{}, key, field string) *bodyError {
	switch v := parent[key].(type) {
	case nil, map[string]interface{}:
	case string:
		dec := json.NewDecoder(strings.NewReader(v))
		dec.UseNumber()
		var parsed interface{}
		if err := dec.Decode(&parsed); err != nil {
			return invalidValue(field, fmt.Sprintf("%s is a string but not JSON: %s; send the schema as an object",
				field, jsonErrorText(err, []byte(v))))
		}
		obj, ok := parsed.(map[string]interface{})
		if !ok {
			return invalidType(field, "a JSON Schema (an object)", parsed)
		}
		parent[key] = obj
	default:
		return invalidType(field, "a JSON Schema (an object)", v)
	}
	return nil
}

// checkField type-checks one known field; it returns the value to send (integral numbers as integers).
func checkField(name string, kind fieldKind, v interface{}) (interface{}, *bodyError) {
	switch kind {
	case kindString:
		if _, ok := v.(string); !ok {
			return nil, invalidType(name, "a string", v)
		}
	case kindBool:
		if _, ok := v.(bool); !ok {
			return nil, invalidType(name, "a boolean", v)
		}
	case kindNumber:
		n, ok := v.(json.Number)
		if !ok {
			return nil, invalidType(name, "a number", v)
		}
		f, err := n.Float64()
		if err != nil {
			return nil, invalidValue(name, fmt.Sprintf("%s=%s is not a finite number", name, n))
		}
		if math.Abs(f) > math.MaxFloat32 { // the proto fields are 32-bit floats: the decoder would refuse it
			return nil, invalidValue(name, fmt.Sprintf("%s=%s is out of range", name, n))
		}
	case kindInt32, kindInt64:
		n, ok := v.(json.Number)
		if !ok {
			return nil, invalidType(name, "an integer", v)
		}
		i, err := strconv.ParseInt(string(n), 10, 64)
		if err != nil { // 16.0 or 1e3 are integers too; 1.5 is not
			f, ferr := n.Float64()
			switch {
			case errors.Is(err, strconv.ErrRange), errors.Is(ferr, strconv.ErrRange),
				ferr == nil && (f < -(1<<63) || f >= 1<<63): // int64(2^63) would wrap to -2^63
				return nil, invalidValue(name, fmt.Sprintf("%s=%s is out of range", name, n))
			case ferr != nil || f != math.Trunc(f):
				return nil, invalidType(name, "an integer", v)
			}
			i = int64(f)
		}
		if kind == kindInt32 && (i > math.MaxInt32 || i < math.MinInt32) {
			return nil, invalidValue(name, fmt.Sprintf("%s=%s is out of range", name, n))
		}
		return json.Number(strconv.FormatInt(i, 10)), nil
	case kindStrings, kindStop:
		list, ok := v.([]interface{})
		if !ok {
			if kind == kindStop {
				return nil, invalidType(name, "a string or an array of strings", v)
			}
			return nil, invalidType(name, "an array of strings", v)
		}
		for i, item := range list {
			if _, ok := item.(string); !ok {
				return nil, invalidType(fmt.Sprintf("%s[%d]", name, i), "a string", item)
			}
		}
	case kindPriority:
		// What the proto decoder takes: a defined name, or an integral int32 (the gateway checks the number).
		expected := "a priority name (PRIORITY_INTERACTIVE, PRIORITY_STANDARD, PRIORITY_BATCH)"
		switch x := v.(type) {
		case string:
			if _, ok := Priority_value[x]; !ok {
				return nil, invalidValue(name, fmt.Sprintf("%s=%s is not a priority: use PRIORITY_INTERACTIVE, "+
					"PRIORITY_STANDARD or PRIORITY_BATCH", name, strconv.Quote(x)))
			}
		case json.Number:
			i, err := strconv.ParseInt(string(x), 10, 32)
			if err != nil {
				return nil, invalidType(name, expected, v)
			}
			return json.Number(strconv.FormatInt(i, 10)), nil
		default:
			return nil, invalidType(name, expected, v)
		}
	case kindObject:
		if _, ok := v.(map[string]interface{}); !ok {
			return nil, invalidType(name, "an object", v)
		}
	case kindLogitBias:
		m, ok := v.(map[string]interface{})
		if !ok {
			return nil, invalidType(name, "an object of token id -> bias", v)
		}
		out := make(map[string]interface{}, len(m))
		for key, bias := range m {
			id, err := strconv.ParseInt(strings.TrimSpace(key), 10, 32)
			if err != nil {
				return nil, invalidValue(name, fmt.Sprintf("%s has the key %s, which is not a token id: keys are "+
					"token ids of the model's vocabulary, written as integers (\"50256\")", name, strconv.Quote(key)))
			}
			field := fmt.Sprintf("%s[%s]", name, strconv.Quote(key))
			fixed, berr := checkField(field, kindNumber, bias)
			if berr != nil {
				return nil, berr
			}
			out[strconv.FormatInt(id, 10)] = fixed
		}
		return out, nil
	case kindInt32s:
		list, ok := v.([]interface{})
		if !ok {
			return nil, invalidType(name, "an array of integers", v)
		}
		out := make([]interface{}, len(list))
		for i, item := range list {
			fixed, err := checkField(fmt.Sprintf("%s[%d]", name, i), kindInt32, item)
			if err != nil {
				return nil, err
			}
			out[i] = fixed
		}
		return out, nil
	}
	return v, nil
}

// ---- access-log recorder ----

// recorder remembers the status for the access log, keeps http.Flusher (streams need it), and moves the
// connection's write deadline before each write (limits.go: write-timeout is per write, not per response).
type recorder struct {
	http.ResponseWriter
	status       int
	wroteHeader  bool
	conn         net.Conn
	writeTimeout time.Duration
}

func (r *recorder) extendWriteDeadline() {
	if r.conn != nil && r.writeTimeout > 0 {
		r.conn.SetWriteDeadline(time.Now().Add(r.writeTimeout))
	}
}

func (r *recorder) WriteHeader(code int) {
	if !r.wroteHeader {
		r.status = code
		r.wroteHeader = true
	}
	r.extendWriteDeadline()
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	r.wroteHeader = true
	r.extendWriteDeadline()
	return r.ResponseWriter.Write(b)
}

func (r *recorder) Flush() {
	r.extendWriteDeadline()
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
