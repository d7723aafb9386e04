package main

// Tests of the sidecar against a fake gateway (a real gRPC server in this process), for what the real mesh
// cannot easily show: Retry-After from trailers, every status mapping, mid-stream errors, metadata filtering.
// Run with `bash deploy/rest/build.sh --test` (tests/test_rest.py does).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const testKey = "Bearer sk-test-secret"

type fakeGateway struct {
	UnimplementedInferenceServiceServer
	mu         sync.Mutex
	md         metadata.MD
	completion *CreateCompletionRequest
	chatStream *StreamChatCompletionRequest
	calls      int           // RPCs that reached the gateway
	arrived    chan struct{} // model "hold": one value per request that is being held
	hold       chan struct{} // model "hold": closed to let the held requests finish
	floodEnded chan struct{} // model "flood": closed when the flooding stream's context ends
}

// failure picks an error by model name, with a retry-after trailer for "rate-limited".
func failure(model string, setTrailer func(metadata.MD)) error {
	switch model {
	case "rate-limited":
		setTrailer(metadata.Pairs("retry-after", "7"))
		return status.Error(codes.ResourceExhausted, "rate limit exceeded: requests per minute of tenant t is 1")
	case "too-large":
		setTrailer(metadata.Pairs("x-should-retry", "false"))
		return status.Error(codes.ResourceExhausted, "this request needs 500 of the tokens per minute of tenant t (100)")
	case "forbidden":
		return status.Error(codes.PermissionDenied, "priority PRIORITY_INTERACTIVE is not allowed")
	case "disabled":
		return status.Error(codes.FailedPrecondition, "model version 'x' is disabled in the registry")
	case "slow":
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case "down":
		return status.Error(codes.Unavailable, "no worker serves the model")
	case "unknown":
		return status.Error(codes.NotFound, "model 'unknown' not found; ListModels (GET /v1/models) lists the available models")
	}
	return nil
}

func responseHeaders() metadata.MD {
	return metadata.Pairs("x-request-id", "req-123", "x-llmserve-cache", "miss",
		"x-llmserve-model-version", "smollm2-v1", "x-internal", "do-not-expose")
}

func (f *fakeGateway) CreateCompletion(ctx context.Context, req *CreateCompletionRequest) (*CreateCompletionResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.md, f.completion = md, req
	f.calls++
	f.mu.Unlock()
	switch req.Model {
	case "hold": // stays in flight until the test releases it
		f.arrived <- struct{}{}
		select {
		case <-f.hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case "delay": // answers after longer than the harness's write timeout
		time.Sleep(400 * time.Millisecond)
	}
	if err := failure(req.Model, func(t metadata.MD) { grpc.SetTrailer(ctx, t) }); err != nil {
		return nil, err
	}
	grpc.SetHeader(ctx, responseHeaders())
	grpc.SetTrailer(ctx, metadata.Pairs("x-trailer", "t", "x-llmserve-worker", "w-1,w-2")) // as the gateway: in the trailer
	return &CreateCompletionResponse{Id: "cmpl-1", Object: "text_completion", Created: 1700000000, Model: "smollm2-v1",
		Choices: []*CompletionChoice{{Index: 0, Text: "a", FinishReason: "length"}, {Index: 1, Text: "b"}},
		Usage:   &Usage{PromptTokens: 2, CompletionTokens: 2, TotalTokens: 4}}, nil
}

func (f *fakeGateway) StreamChatCompletion(req *StreamChatCompletionRequest, stream InferenceService_StreamChatCompletionServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	f.mu.Lock()
	f.md, f.chatStream = md, req
	f.calls++
	f.mu.Unlock()
	if err := failure(req.Model, stream.SetTrailer); err != nil {
		return err
	}
	// As the gateway: a stream names its first worker in the initial metadata, every worker in the trailer.
	stream.SetHeader(metadata.Join(responseHeaders(), metadata.Pairs("x-llmserve-worker", "w-1")))
	stream.SetTrailer(metadata.Pairs("x-llmserve-worker", "w-1,w-2"))
	chunk := func(role, content, reason string) *StreamChatCompletionResponse {
		return &StreamChatCompletionResponse{Id: "chatcmpl-1", Object: "chat.completion.chunk", Created: 1700000000,
			Model: "smollm2-v1", Choices: []*ChatChunkChoice{{Index: 0, FinishReason: reason,
				Delta: &ChatDelta{Role: role, Content: content}}}}
	}
	switch req.Model {
	case "ticking": // a stream that lasts several write timeouts, one chunk every 100 ms
		for i := 0; i < 6; i++ {
			if err := stream.Send(chunk("", "tick", "")); err != nil {
				return err
			}
			time.Sleep(100 * time.Millisecond)
		}
		stream.Send(chunk("", "", "stop"))
		return nil
	case "flood": // 64 KiB chunks as fast as they can go, until the call is cancelled
		big := strings.Repeat("x", 64<<10)
		for stream.Send(chunk("", big, "")) == nil {
		}
		<-stream.Context().Done()
		close(f.floodEnded)
		return stream.Context().Err()
	}
	stream.Send(chunk("assistant", "Hel", ""))
	if req.Model == "midstream" {
		return status.Error(codes.Unavailable, "the worker went away; retry")
	}
	stream.Send(chunk("", "lo", ""))
	stream.Send(chunk("", "", "stop"))
	if req.StreamOptions == nil || req.StreamOptions.IncludeUsage {
		stream.Send(&StreamChatCompletionResponse{Id: "chatcmpl-1", Object: "chat.completion.chunk",
			Model: "smollm2-v1", Usage: &Usage{PromptTokens: 3, CompletionTokens: 2, TotalTokens: 5}})
	}
	return nil
}

func (f *fakeGateway) CreateEmbeddings(ctx context.Context, req *CreateEmbeddingsRequest) (*CreateEmbeddingsResponse, error) {
	return &CreateEmbeddingsResponse{Object: "list", Model: "minilm-v1",
		Data:  []*Embedding{{Index: 0, Object: "embedding", Embedding: []float32{0.5, -1.25, 3.1415927}}},
		Usage: &EmbeddingsUsage{PromptTokens: 1, TotalTokens: 1}}, nil
}

type harness struct {
	t       *testing.T
	url     string
	gateway *fakeGateway
	health  *health.Server
	log     *bytes.Buffer
}

func newHarness(t *testing.T) *harness {
	lim := defaultLimits()
	lim.maxBody = 4096
	return newHarnessWith(t, lim)
}

// newHarnessWith serves the sidecar from the same http.Server as main (newServer), with these limits.
func newHarnessWith(t *testing.T, lim limits) *harness {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	fake := &fakeGateway{arrived: make(chan struct{}, 16), hold: make(chan struct{}), floodEnded: make(chan struct{})}
	RegisterInferenceServiceServer(server, fake)
	hs := health.NewServer()
	hs.SetServingStatus(inferenceService, grpc_health_v1.HealthCheckResponse_SERVING)
	grpc_health_v1.RegisterHealthServer(server, hs)
	go server.Serve(lis)
	ctx, cancel := context.WithCancel(context.Background())
	conn, handler, err := newSidecar(ctx, lis.Addr().String(), lim, grpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	logs := &bytes.Buffer{}
	accessLog.SetOutput(logs)
	web := httptest.NewUnstartedServer(handler)
	web.Config = newServer(handler, lim)
	web.Start()
	t.Cleanup(func() {
		web.Close()
		conn.Close()
		cancel()
		server.Stop()
	})
	return &harness{t: t, url: web.URL, gateway: fake, health: hs, log: logs}
}

func (h *harness) do(method, path, body string, headers ...string) (*http.Response, string) {
	h.t.Helper()
	req, _ := http.NewRequest(method, h.url+path, strings.NewReader(body))
	req.Header.Set("Authorization", testKey)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, string(raw)
}

type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func parseError(t *testing.T, body string) openAIError {
	t.Helper()
	var e openAIError
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("not an OpenAI error body: %q (%v)", body, err)
	}
	return e
}

func sseData(t *testing.T, body string) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		if !strings.HasPrefix(line, "data: ") {
			t.Fatalf("not an SSE data line: %q", line)
		}
		out = append(out, strings.TrimPrefix(line, "data: "))
	}
	return out
}

func TestUnaryMetadataAndJSON(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/completions",
		`{"model":"m","prompt":["x","y"],"stop":"\n","max_tokens":4.0,"user":null,"logprobs":null,"echo":false}`,
		"Grpc-Metadata-Evil", "1", "X-Other", "2")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	md := h.gateway.md
	if got := md.Get("authorization"); len(got) != 1 || got[0] != testKey {
		t.Errorf("authorization metadata = %q, want exactly [%q]", got, testKey)
	}
	for k := range md {
		if strings.Contains(k, "evil") || strings.Contains(k, "other") || strings.HasPrefix(k, "grpcgateway-") {
			t.Errorf("request header leaked into metadata: %s", k)
		}
	}
	req := h.gateway.completion
	if len(req.Prompts) != 2 || req.Prompt != "" || len(req.Stop) != 1 || req.Stop[0] != "\n" ||
		req.MaxTokens.GetValue() != 4 {
		t.Errorf("request not normalised: %+v", req)
	}
	for _, k := range []string{"X-Request-Id", "X-Llmserve-Cache", "X-Llmserve-Model-Version"} {
		if resp.Header.Get(k) == "" {
			t.Errorf("missing header %s", k)
		}
	}
	if got := resp.Header.Values("X-Llmserve-Worker"); len(got) != 1 || got[0] != "w-1,w-2" {
		t.Errorf("X-Llmserve-Worker = %q, want the trailer's [w-1,w-2]", got)
	}
	for k := range resp.Header {
		if strings.HasPrefix(k, "Grpc-") || k == "Trailer" || k == "X-Internal" {
			t.Errorf("metadata noise in response headers: %s", k)
		}
	}
	var out map[string]interface{}
	json.Unmarshal([]byte(body), &out)
	choices := out["choices"].([]interface{})
	if choices[0].(map[string]interface{})["finish_reason"] != "length" ||
		choices[1].(map[string]interface{})["finish_reason"] != nil {
		t.Errorf("finish_reason: %s", body)
	}
	if _, ok := out["created"].(float64); !ok {
		t.Errorf("created is not a JSON number: %s", body)
	}
	if strings.Contains(h.log.String(), "sk-test-secret") || strings.Contains(h.log.String(), `"x"`) {
		t.Errorf("the access log holds a key or a body: %s", h.log.String())
	}
	if !strings.Contains(h.log.String(), "POST /v1/completions 200") {
		t.Errorf("no access-log line: %q", h.log.String())
	}
}

func TestStreamSSE(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/chat/completions",
		`{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"stream":true}`)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("status %d, content type %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	if got := resp.Header.Values("X-Llmserve-Worker"); len(got) != 1 || got[0] != "w-1" {
		t.Errorf("X-Llmserve-Worker = %q, want the initial metadata's [w-1]", got)
	}
	if resp.Trailer.Get("X-Llmserve-Worker") != "" || strings.Contains(body, "w-1") {
		t.Errorf("a worker id outside the X-Llmserve-Worker header: trailer %v, body %s", resp.Trailer, body)
	}
	req := h.gateway.chatStream
	if req.StreamOptions == nil || req.StreamOptions.IncludeUsage {
		t.Errorf("stream_options not injected as include_usage=false: %+v", req.StreamOptions)
	}
	if req.Messages[0].Role != "system" || req.Messages[0].Content != "a\nb" {
		t.Errorf("message not normalised: %+v", req.Messages[0])
	}
	data := sseData(t, body)
	if len(data) != 4 || data[3] != "[DONE]" {
		t.Fatalf("frames: %q", data)
	}
	var first, second, last map[string]interface{}
	json.Unmarshal([]byte(data[0]), &first)
	json.Unmarshal([]byte(data[1]), &second)
	json.Unmarshal([]byte(data[2]), &last)
	c0 := first["choices"].([]interface{})[0].(map[string]interface{})
	if c0["finish_reason"] != nil || c0["delta"].(map[string]interface{})["role"] != "assistant" {
		t.Errorf("first chunk: %s", data[0])
	}
	if _, hasRole := second["choices"].([]interface{})[0].(map[string]interface{})["delta"].(map[string]interface{})["role"]; hasRole {
		t.Errorf("empty role not removed: %s", data[1])
	}
	if last["choices"].([]interface{})[0].(map[string]interface{})["finish_reason"] != "stop" {
		t.Errorf("last chunk: %s", data[2])
	}
	for _, d := range data[:3] {
		if strings.Contains(d, `"usage"`) {
			t.Errorf("usage in a chunk without usage: %s", d)
		}
	}
}

func TestStreamIncludeUsage(t *testing.T) {
	h := newHarness(t)
	_, body := h.do("POST", "/v1/chat/completions:stream",
		`{"model":"m","messages":[{"role":"user","content":"a"}],"stream_options":{"include_usage":true}}`)
	if !h.gateway.chatStream.StreamOptions.GetIncludeUsage() {
		t.Errorf("include_usage not passed on")
	}
	data := sseData(t, body)
	if len(data) != 5 || data[4] != "[DONE]" || !strings.Contains(data[3], `"usage":{`) ||
		!strings.Contains(data[3], `"choices":[]`) {
		t.Fatalf("frames: %q", data)
	}
	for _, d := range data[:3] { // as OpenAI: "usage": null in every chunk but the last
		if !strings.Contains(d, `"usage":null`) {
			t.Errorf("no null usage in a chunk of an include_usage stream: %s", d)
		}
	}
}

func TestErrorMapping(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		model  string
		status int
		code   string
	}{
		{"rate-limited", 429, "resource_exhausted"}, {"too-large", 429, "resource_exhausted"},
		{"forbidden", 403, "permission_denied"},
		{"disabled", 400, "failed_precondition"}, {"slow", 504, "deadline_exceeded"},
		{"down", 503, "unavailable"}, {"unknown", 404, "model_not_found"},
	}
	for _, c := range cases {
		for _, path := range []string{"/v1/completions", "/v1/chat/completions"} {
			body := `{"model":"` + c.model + `","prompt":"x"}`
			if strings.Contains(path, "chat") { // the stream path: errors before the first chunk keep their status
				body = `{"model":"` + c.model + `","messages":[{"role":"user","content":"x"}],"stream":true}`
			}
			resp, out := h.do("POST", path, body)
			if resp.StatusCode != c.status {
				t.Errorf("%s %s: status %d, want %d: %s", path, c.model, resp.StatusCode, c.status, out)
				continue
			}
			e := parseError(t, out)
			if e.Error.Code == nil || *e.Error.Code != c.code {
				t.Errorf("%s %s: code %v, want %s", path, c.model, e.Error.Code, c.code)
			}
			if got := resp.Header.Get("Retry-After"); (c.model == "rate-limited") != (got == "7") {
				t.Errorf("%s %s: Retry-After %q", path, c.model, got)
			}
			if got := resp.Header.Get("X-Should-Retry"); (c.model == "too-large") != (got == "false") {
				t.Errorf("%s %s: X-Should-Retry %q", path, c.model, got)
			}
		}
	}
}

func TestMidStreamError(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/chat/completions",
		`{"model":"midstream","messages":[{"role":"user","content":"x"}],"stream":true}`)
	data := sseData(t, body)
	if resp.StatusCode != 200 || len(data) != 2 {
		t.Fatalf("status %d, frames %q", resp.StatusCode, data)
	}
	e := parseError(t, data[1])
	if *e.Error.Code != "unavailable" || !strings.Contains(h.log.String(), "stream_error=UNAVAILABLE") {
		t.Errorf("error event %s, log %q", data[1], h.log.String())
	}
}

func TestBase64Embeddings(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/embeddings", `{"model":"m","input":"x","encoding_format":"base64"}`)
	if _, named := resp.Header["X-Llmserve-Worker"]; named { // metadata naming no worker (as a cache hit's)
		t.Errorf("X-Llmserve-Worker without a worker in the metadata: %q", resp.Header.Values("X-Llmserve-Worker"))
	}
	var out struct {
		Data []struct {
			Embedding string `json:"embedding"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &out); err != nil || len(out.Data) != 1 {
		t.Fatalf("%v: %s", err, body)
	}
	raw, _ := base64.StdEncoding.DecodeString(out.Data[0].Embedding)
	want := []float32{0.5, -1.25, 3.1415927}
	if len(raw) != 12 {
		t.Fatalf("decoded %d bytes", len(raw))
	}
	for i, w := range want {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])); got != w {
			t.Errorf("[%d] = %v, want %v", i, got, w)
		}
	}
	_, body = h.do("POST", "/v1/embeddings", `{"model":"m","input":["x"],"encoding_format":"float"}`)
	if !strings.Contains(body, `"embedding":[0.5,-1.25,3.1415927]`) {
		t.Errorf("float embeddings: %s", body)
	}
}

func TestHealth(t *testing.T) {
	h := newHarness(t)
	if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 200 {
		t.Fatalf("serving: %d %s", resp.StatusCode, body)
	}
	h.health.SetServingStatus(inferenceService, grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 503 {
		t.Fatalf("not serving: %d %s", resp.StatusCode, body)
	}
}

func TestBodyAndRouteErrors(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		method, path, body string
		status             int
		param              string
	}{
		{"POST", "/v1/completions", `{"model":`, 400, ""},
		{"POST", "/v1/completions", `{"model":"m"} x`, 400, ""},
		{"POST", "/v1/completions", `[]`, 400, ""},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":"abc"}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":1.5}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":9999999999}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":[1,"x"]}`, 400, "prompt[1]"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","stop":[1]}`, 400, "stop[0]"},
		{"POST", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}`, 400, "messages[0].content"},
		{"POST", "/v1/chat/completions", `{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":"yes"}}`, 400, "stream_options.include_usage"},
		{"POST", "/v1/embeddings", `{"model":"m","input":"x","encoding_format":"int8"}`, 400, "encoding_format"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"` + strings.Repeat("a", 5000) + `"}`, 413, ""},
		{"POST", "/v1/nope", `{}`, 404, ""},
		{"GET", "/v1/chat/completions", ``, 405, ""},
		{"POST", "/v1/models", `{}`, 405, ""},
		{"GET", "/", ``, 404, ""},
		{"POST", "/v1/embeddings:stream", `{}`, 404, ""},
	}
	for _, c := range cases {
		resp, body := h.do(c.method, c.path, c.body)
		if resp.StatusCode != c.status {
			t.Errorf("%s %s %.60s: status %d, want %d: %s", c.method, c.path, c.body, resp.StatusCode, c.status, body)
			continue
		}
		e := parseError(t, body)
		if c.param != "" && (e.Error.Param == nil || *e.Error.Param != c.param) {
			t.Errorf("%s %.60s: param %v, want %s (%s)", c.path, c.body, e.Error.Param, c.param, body)
		}
	}
}

// The int64 seed is sent as a JSON number and reaches the gateway intact.
func TestSeedAndWrappers(t *testing.T) {
	h := newHarness(t)
	h.do("POST", "/v1/completions", `{"model":"m","prompt":"x","seed":9007199254740993,"temperature":0,"n":2}`)
	req := h.gateway.completion
	if req.Seed.GetValue() != 9007199254740993 || req.Temperature == nil || req.N.GetValue() != 2 {
		t.Errorf("wrappers: %+v", req)
	}
}

// ---- what one client can hold: bearer check, timeouts, header cap, concurrency limit (limits.go) ----

// request sends one request with exactly these headers (no Authorization unless given).
func (h *harness) request(method, path, body string, header http.Header) (*http.Response, string) {
	h.t.Helper()
	req, _ := http.NewRequest(method, h.url+path, strings.NewReader(body))
	for k, vs := range header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, string(raw)
}

func (h *harness) dial() net.Conn {
	h.t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close() })
	return c
}

func (h *harness) calls() int {
	h.gateway.mu.Lock()
	defer h.gateway.mu.Unlock()
	return h.gateway.calls
}

func TestMissingBearerIs401BeforeTheBody(t *testing.T) {
	h := newHarness(t)
	completion := `{"model":"m","prompt":"x"}`
	for _, c := range []struct {
		name   string
		method string
		path   string
		auth   []string
	}{
		{"no header", "POST", "/v1/completions", nil},
		{"basic auth", "POST", "/v1/completions", []string{"Basic dXNlcjpwYXNz"}},
		{"empty token", "POST", "/v1/chat/completions", []string{"Bearer "}},
		{"blank in token", "POST", "/v1/completions", []string{"Bearer sk a"}},
		{"two headers", "POST", "/v1/completions", []string{testKey, testKey}},
		{"models", "GET", "/v1/models", nil},
		{"unknown route", "POST", "/v1/nope", nil},
		{"invalid JSON", "POST", "/v1/completions", []string{"Token x"}},
	} {
		body := completion
		if c.name == "invalid JSON" {
			body = `{{{{`
		}
		resp, out := h.request(c.method, c.path, body, http.Header{"Authorization": c.auth})
		if resp.StatusCode != 401 {
			t.Errorf("%s: status %d, want 401: %s", c.name, resp.StatusCode, out)
			continue
		}
		if e := parseError(t, out); e.Error.Code == nil || *e.Error.Code != "missing_api_key" ||
			e.Error.Type != "authentication_error" {
			t.Errorf("%s: error %s", c.name, out)
		}
		if !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s: WWW-Authenticate %q", c.name, resp.Header.Get("WWW-Authenticate"))
		}
	}
	if n := h.calls(); n != 0 {
		t.Errorf("%d requests without a bearer token reached the gateway", n)
	}
	// The scheme is case-insensitive; the key itself is the gateway's to judge.
	if resp, out := h.request("POST", "/v1/completions", completion,
		http.Header{"Authorization": {"bearer sk-test-secret"}}); resp.StatusCode != 200 {
		t.Errorf("lower-case bearer: %d %s", resp.StatusCode, out)
	}
	if resp, out := h.request("GET", "/health", "", nil); resp.StatusCode != 200 {
		t.Errorf("/health needs no key: %d %s", resp.StatusCode, out)
	}

	// Not even read: a body announced as 1 MB (over the 4096-byte limit, which would be 413 once read) whose
	// first bytes are garbage and whose rest never comes still gets its 401 at once, and the connection closes.
	c := h.dial()
	io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"Content-Length: 1000000\r\n\r\n{{{{garbage")
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	started := time.Now()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer to a request whose body never arrives: %v", err)
	}
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 401 || time.Since(started) > time.Second || !resp.Close {
		t.Errorf("status %d after %v, close %v: %s", resp.StatusCode, time.Since(started), resp.Close, raw)
	}
	parseError(t, string(raw))
}

// A client that sends its headers one byte at a time is cut off after the header timeout (counted from the
// first byte, not per byte), while others are served meanwhile.
func TestSlowHeadersAreCutOff(t *testing.T) {
	lim := defaultLimits()
	lim.readHeaderTimeout = 300 * time.Millisecond
	h := newHarnessWith(t, lim)
	c := h.dial()
	closed := make(chan time.Duration, 1)
	started := time.Now()
	go func() {
		io.Copy(io.Discard, c) // returns when the server closes the connection
		closed <- time.Since(started)
	}()
	headers := "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + testKey + "\r\nX-Pad: " +
		strings.Repeat("a", 200) + "\r\n\r\n"
	served := false
	for i := 0; i < len(headers); i++ {
		select {
		case took := <-closed:
			if took < 250*time.Millisecond || took > 2*time.Second {
				t.Errorf("cut off after %v, want about %v", took, lim.readHeaderTimeout)
			}
			if !served {
				t.Errorf("no normal request was served while the slow client held its connection")
			}
			return
		default:
		}
		if _, err := c.Write([]byte{headers[i]}); err != nil {
			break // the server has closed it
		}
		if !served && i == 3 {
			if resp, out := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x"}`); resp.StatusCode != 200 {
				t.Errorf("a normal request meanwhile: %d %s", resp.StatusCode, out)
			}
			served = true
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case took := <-closed:
		if took > 2*time.Second {
			t.Errorf("cut off after %v", took)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("a client trickling its headers for %v was not cut off", time.Since(started))
	}
}

// A body that trickles in is refused (408) when the read timeout passes, and the gateway never sees it.
func TestSlowBodyIsCutOff(t *testing.T) {
	lim := defaultLimits()
	lim.readTimeout = 400 * time.Millisecond
	h := newHarnessWith(t, lim)
	c := h.dial()
	io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "+testKey+
		"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
	answered := make(chan *http.Response, 1)
	go func() {
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			resp = nil
		}
		answered <- resp
	}()
	started := time.Now()
	for {
		select {
		case resp := <-answered:
			if resp == nil || resp.StatusCode != http.StatusRequestTimeout {
				t.Fatalf("slow body: %+v", resp)
			}
			if took := time.Since(started); took > 2*time.Second {
				t.Errorf("answered after %v", took)
			}
			if h.calls() != 0 {
				t.Errorf("the unfinished request reached the gateway")
			}
			return
		case <-time.After(50 * time.Millisecond):
			c.Write([]byte(" "))
		}
		if time.Since(started) > 3*time.Second {
			t.Fatal("a trickling body was not cut off")
		}
	}
}

// The write timeout is per write: a stream that lasts several write timeouts and a unary answer that takes
// longer than one both arrive whole (a whole-response WriteTimeout would cut them).
func TestWriteTimeoutDoesNotCutLongResponses(t *testing.T) {
	lim := defaultLimits()
	lim.writeTimeout = 200 * time.Millisecond
	h := newHarnessWith(t, lim)
	started := time.Now()
	resp, body := h.do("POST", "/v1/chat/completions",
		`{"model":"ticking","messages":[{"role":"user","content":"x"}],"stream":true}`)
	data := sseData(t, body)
	if resp.StatusCode != 200 || len(data) != 8 || data[7] != "[DONE]" || time.Since(started) < 500*time.Millisecond {
		t.Fatalf("status %d after %v, frames %q", resp.StatusCode, time.Since(started), data)
	}
	if resp, body := h.do("POST", "/v1/completions", `{"model":"delay","prompt":"x"}`); resp.StatusCode != 200 ||
		!strings.Contains(body, `"text":"a"`) {
		t.Fatalf("a slow unary answer: %d %s", resp.StatusCode, body)
	}
}

// A client that stops reading a stream is cut off once a write blocks for the write timeout, and the gRPC
// call is cancelled (generation stops).
func TestStalledReaderIsCutOff(t *testing.T) {
	lim := defaultLimits()
	lim.writeTimeout = 300 * time.Millisecond
	h := newHarnessWith(t, lim)
	c := h.dial()
	body := `{"model":"flood","messages":[{"role":"user","content":"x"}],"stream":true}`
	io.WriteString(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "+testKey+
		"\r\nContent-Type: application/json\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body)
	// ... and never reads.
	select {
	case <-h.gateway.floodEnded:
	case <-time.After(10 * time.Second):
		t.Fatal("a client that stopped reading still holds its stream after 10 s")
	}
	if resp, out := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x"}`); resp.StatusCode != 200 {
		t.Errorf("after the stalled reader: %d %s", resp.StatusCode, out)
	}
}

func TestIdleConnectionsAreClosed(t *testing.T) {
	lim := defaultLimits()
	lim.idleTimeout = 300 * time.Millisecond
	h := newHarnessWith(t, lim)
	c := h.dial()
	io.WriteString(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 || resp.Close {
		t.Fatalf("health on a keep-alive connection: %v %+v", err, resp)
	}
	io.Copy(io.Discard, resp.Body)
	started := time.Now()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF || time.Since(started) > 2*time.Second {
		t.Errorf("idle connection: %v after %v, want EOF after about %v", err, time.Since(started), lim.idleTimeout)
	}
}

func TestLargeHeadersAre431(t *testing.T) {
	lim := defaultLimits()
	lim.maxHeaderBytes = 1024
	h := newHarnessWith(t, lim)
	// net/http allows 4096 bytes of slack over MaxHeaderBytes.
	resp, _ := h.request("GET", "/health", "", http.Header{"X-Big": {strings.Repeat("a", 8<<10)}})
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("8 KiB of headers over a 1 KiB cap: %d", resp.StatusCode)
	}
	if resp, _ := h.request("GET", "/health", "", nil); resp.StatusCode != 200 {
		t.Errorf("small headers: %d", resp.StatusCode)
	}
}

// Beyond max-concurrent-requests: 503 with Retry-After and an OpenAI error, before the body is read; /health
// still answers; the slots come back when requests end.
func TestConcurrencyLimit(t *testing.T) {
	lim := defaultLimits()
	lim.maxConcurrent = 2
	h := newHarnessWith(t, lim)
	var once sync.Once
	release := func() { once.Do(func() { close(h.gateway.hold) }) }
	t.Cleanup(release) // a failing test must not leave held requests behind (the server would wait for them)
	var wg sync.WaitGroup
	statuses := make(chan int, 2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, _ := h.do("POST", "/v1/completions", `{"model":"hold","prompt":"x"}`)
			statuses <- resp.StatusCode
		}()
	}
	for i := 0; i < 2; i++ {
		select {
		case <-h.gateway.arrived:
		case <-time.After(5 * time.Second):
			t.Fatal("the held requests did not reach the gateway")
		}
	}
	calls := h.calls()
	resp, body := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x"}`)
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "1" {
		t.Fatalf("a third request with two in flight: %d (Retry-After %q) %s", resp.StatusCode,
			resp.Header.Get("Retry-After"), body)
	}
	if e := parseError(t, body); e.Error.Code == nil || *e.Error.Code != "server_overloaded" {
		t.Errorf("503 body: %s", body)
	}
	if h.calls() != calls {
		t.Errorf("the refused request reached the gateway")
	}
	if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 200 {
		t.Errorf("/health while full: %d %s", resp.StatusCode, body)
	}
	release()
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != 200 {
			t.Errorf("a held request ended with %d", s)
		}
	}
	for i := 0; i < 3; i++ {
		if resp, body := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x"}`); resp.StatusCode != 200 {
			t.Errorf("after the held requests ended: %d %s", resp.StatusCode, body)
		}
	}
}

func TestOpenAPIDocument(t *testing.T) {
	h := newHarness(t)
	resp, err := http.Get(h.url + "/openapi.json") // public: no bearer token
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		OpenAPI string                     `json:"openapi"`
		Paths   map[string]json.RawMessage `json:"paths"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil || resp.StatusCode != 200 ||
		resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /openapi.json: %d %v", resp.StatusCode, err)
	}
	for _, path := range []string{"/v1/completions", "/v1/chat/completions", "/v1/chat", "/v1/embeddings",
		"/v1/models", "/v1/models/{model}", "/health"} {
		if _, ok := doc.Paths[path]; !ok || doc.OpenAPI != "3.1.0" {
			t.Fatalf("the document (OpenAPI %q) lacks %s", doc.OpenAPI, path)
		}
	}
	if resp, body := h.do("POST", "/openapi.json", "{}"); resp.StatusCode != 405 {
		t.Fatalf("POST /openapi.json: %d %s", resp.StatusCode, body)
	}
}

// Values that pass the JSON type checks but not the proto field's decoder get a message in the request's terms,
// naming the field, never the Go decoder's text ("cannot unmarshal number ... into Go value of type float32").
// Found by the REST fuzzer (tests/fuzz/test_rest.py): temperature=-1.7e307.
func TestValuesTheProtoCannotHoldAreNamed(t *testing.T) {
	h := newHarness(t)
	cases := []struct{ path, body, param string }{
		{"/v1/chat/completions", `{"model":"","messages":[{"content":null,"role":"user"}],"temperature":-3.402823567797337e+38}`, "temperature"},
		{"/v1/completions", `{"model":"m","prompt":"x","top_p":3.5e38}`, "top_p"},
		{"/v1/completions", `{"model":"m","prompt":"x","priority":1.5}`, "priority"},
		{"/v1/completions", `{"model":"m","prompt":"x","priority":""}`, "priority"},
		{"/v1/embeddings", `{"model":"m","input":"x","priority":"PRIORITY_URGENT"}`, "priority"},
		{"/v1/completions", `{"model":"m","prompt":"x","priority":99999999999}`, "priority"},
		{"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}`, "messages[0].content"},
		// Found by the REST fuzzer: 2^63 passed the int64 check and wrapped to -2^63 (a different seed, silently).
		{"/v1/completions", `{"model":"m","prompt":"x","seed":9223372036854775808}`, "seed"},
		{"/v1/completions", `{"model":"m","prompt":"x","seed":9.223372036854775808e18}`, "seed"},
		{"/v1/completions", `{"model":"m","prompt":"x","seed":-1e19}`, "seed"},
		{"/v1/completions", `{"model":"m","prompt":"x","max_tokens":1e400}`, "max_tokens"},
	}
	for _, c := range cases {
		resp, body := h.do("POST", c.path, c.body)
		if resp.StatusCode != 400 {
			t.Errorf("%s: status %d: %s", c.body, resp.StatusCode, body)
			continue
		}
		e := parseError(t, body)
		for _, internal := range []string{"Go value", "unmarshal", "<nil>", "enum llmserve"} {
			if strings.Contains(e.Error.Message, internal) {
				t.Errorf("%s: the message is the decoder's: %s", c.body, body)
			}
		}
		if e.Error.Param == nil || *e.Error.Param != c.param {
			t.Errorf("%s: param %v, want %s: %s", c.body, e.Error.Param, c.param, body)
		}
	}
	// Numbers and names the decoder takes still reach the gateway.
	if resp, body := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x","priority":"PRIORITY_BATCH","temperature":3.4e38}`); resp.StatusCode != 200 {
		t.Errorf("a valid priority name and a float32-sized number: %d %s", resp.StatusCode, body)
	}
	if resp, body := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x","priority":3}`); resp.StatusCode != 200 {
		t.Errorf("a priority number: %d %s", resp.StatusCode, body)
	}
	for _, seed := range []string{"9223372036854775807", "-9223372036854775808", "-9.223372036854775808e18"} {
		resp, body := h.do("POST", "/v1/completions", `{"model":"m","prompt":"x","seed":`+seed+`}`)
		got := h.gateway.completion.Seed.GetValue()
		if resp.StatusCode != 200 || strconv.FormatInt(got, 10) != strings.Replace(seed, "-9.223372036854775808e18",
			"-9223372036854775808", 1) {
			t.Errorf("seed %s: %d %s, the gateway got %d", seed, resp.StatusCode, body, got)
		}
	}
}
