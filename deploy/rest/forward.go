package main

// Response forwarders that replace grpc-gateway's generated forward_* variables: unary responses as plain
// JSON, streams as server-sent events (OpenAI's `data: {...}\n\n` ... `data: [DONE]\n\n`), both with the
// JSON fix-ups OpenAI clients rely on (finish_reason null until a choice ends, no empty delta role, no
// usage in chunks that carry none, base64 embeddings on request).

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/golang/protobuf/proto"
	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type unaryForwarder = func(context.Context, *runtime.ServeMux, runtime.Marshaler, http.ResponseWriter, *http.Request,
	proto.Message, ...func(context.Context, http.ResponseWriter, proto.Message) error)
type streamForwarder = func(context.Context, *runtime.ServeMux, runtime.Marshaler, http.ResponseWriter, *http.Request,
	func() (proto.Message, error), ...func(context.Context, http.ResponseWriter, proto.Message) error)

func init() {
	// The generated gateway (compiled into this package by build.sh) calls these per method.
	var u unaryForwarder = forwardJSON
	var s streamForwarder = forwardSSE
	forward_InferenceService_CreateCompletion_0 = u
	forward_InferenceService_CreateChatCompletion_0 = u
	forward_InferenceService_CreateChatCompletion_1 = u
	forward_InferenceService_CreateEmbeddings_0 = u
	forward_InferenceService_ListModels_0 = u
	forward_InferenceService_StreamCompletion_0 = s
	forward_InferenceService_StreamChatCompletion_0 = s
	forward_InferenceService_StreamChatCompletion_1 = s
	forward_InferenceService_Tokenize_0 = u
	forward_InferenceService_Tokenize_1 = u
	forward_InferenceService_Detokenize_0 = u
	forward_InferenceService_Detokenize_1 = u
}

// The gateway's response metadata that becomes HTTP headers (under the same names); all other metadata stays.
var exposedMetadata = []string{"x-llmserve-cache", "x-llmserve-model-version", "x-llmserve-worker", "x-request-id"}

// workerMetadata names the worker(s) that served a request, comma-separated. The gateway sends it in the trailer
// (every worker, a migrated stream's too) and, for a stream, in the initial metadata once its first task reached
// a worker: a stream's HTTP headers precede its body, so they carry the workers known then. A cache hit names none.
const workerMetadata = "x-llmserve-worker"

func exposedHeader(key string) (string, bool) {
	key = strings.ToLower(key)
	for _, k := range exposedMetadata {
		if k == key {
			return key, true
		}
	}
	return "", false
}

func exposeMetadata(w http.ResponseWriter, md metadata.MD, state *requestState) {
	for _, k := range exposedMetadata {
		if vals := md.Get(k); len(vals) > 0 && vals[0] != "" {
			w.Header().Set(k, vals[0])
			if k == "x-request-id" {
				state.requestID = vals[0]
			}
		}
	}
}

// exposeWorker sets x-llmserve-worker from the first trailer that has it: a unary response's trailer arrives
// before its HTTP headers are written, and names every worker (the initial metadata, if any, fewer).
func exposeWorker(w http.ResponseWriter, trailers ...metadata.MD) {
	for _, md := range trailers {
		if vals := md.Get(workerMetadata); len(vals) > 0 && vals[0] != "" {
			w.Header().Set(workerMetadata, vals[0])
			return
		}
	}
}

func forwardJSON(ctx context.Context, mux *runtime.ServeMux, marshaler runtime.Marshaler, w http.ResponseWriter,
	req *http.Request, resp proto.Message, _ ...func(context.Context, http.ResponseWriter, proto.Message) error) {
	state := stateFrom(ctx)
	md, _ := runtime.ServerMetadataFromContext(ctx)
	buf, err := marshalFixed(marshaler, resp, state, false)
	if err != nil {
		writeGRPCError(ctx, mux, marshaler, w, req, status.Errorf(codes.Internal, "encoding the response: %v", err))
		return
	}
	exposeMetadata(w, md.HeaderMD, state)
	exposeWorker(w, md.TrailerMD)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(buf)))
	w.WriteHeader(http.StatusOK)
	w.Write(buf)
}

// forwardSSE waits for the first message before it answers 200, so that errors raised before any output
// (auth, validation, unknown model, rate limits) keep their HTTP status and error body.
func forwardSSE(ctx context.Context, mux *runtime.ServeMux, marshaler runtime.Marshaler, w http.ResponseWriter,
	req *http.Request, recv func() (proto.Message, error),
	_ ...func(context.Context, http.ResponseWriter, proto.Message) error) {
	state := stateFrom(ctx)
	flusher, _ := w.(http.Flusher)
	msg, err := recv()
	if err != nil && err != io.EOF {
		writeGRPCError(ctx, mux, marshaler, w, req, err)
		return
	}
	md, _ := runtime.ServerMetadataFromContext(ctx)
	exposeMetadata(w, md.HeaderMD, state)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	send := func(data []byte) bool {
		var frame bytes.Buffer
		frame.Grow(len(data) + 8)
		frame.WriteString("data: ")
		frame.Write(data)
		frame.WriteString("\n\n")
		if _, werr := w.Write(frame.Bytes()); werr != nil {
			return false // the client went away; returning cancels the gRPC call
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	for err == nil {
		buf, merr := marshalFixed(marshaler, msg, state, true)
		if merr != nil {
			err = status.Errorf(codes.Internal, "encoding a stream chunk: %v", merr)
			break
		}
		if !send(buf) {
			return
		}
		msg, err = recv()
	}
	if err == io.EOF {
		send([]byte("[DONE]"))
		return
	}
	if req.Context().Err() != nil { // the client went away: nobody to tell
		state.streamError = "CLIENT_CLOSED"
		return
	}
	// An error after the 200: OpenAI's in-stream error event (the SDK raises it as an APIError).
	s := status.Convert(err)
	state.streamError = codeName(s.Code())
	_, body := openAIErrorBody(httpStatusFromCode(s.Code()), grpcMessage(s, state), paramFromMessage(s.Message(), state),
		errorCodeFor(s))
	send(body)
}

// marshalFixed marshals a response with the mux's JSONPb marshaler, then applies the OpenAI fix-ups.
func marshalFixed(marshaler runtime.Marshaler, msg proto.Message, state *requestState, chunk bool) ([]byte, error) {
	raw, err := marshaler.Marshal(msg)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // numbers pass through exactly as the marshaler wrote them
	var obj map[string]interface{}
	if err := dec.Decode(&obj); err != nil {
		return nil, err
	}
	if choices, ok := obj["choices"].([]interface{}); ok {
		for _, c := range choices {
			choice, ok := c.(map[string]interface{})
			if !ok {
				continue
			}
			if r, ok := choice["finish_reason"].(string); ok && r == "" {
				choice["finish_reason"] = nil // OpenAI: null until the choice ends
			}
			reshapeLogprobs(choice, obj["object"] == "text_completion")
			fixToolFields(choice) // tools.go
			if delta, ok := choice["delta"].(map[string]interface{}); ok {
				if role, ok := delta["role"].(string); ok && role == "" {
					delete(delta, "role") // only a choice's first chunk names the role
				}
			}
		}
	}
	if chunk {
		// OpenAI: with include_usage every chunk has "usage", null but in the last one; without it, none has.
		if usage, present := obj["usage"]; present && usage == nil && !state.usageChunk {
			delete(obj, "usage")
		}
	}
	if data, ok := obj["data"].([]interface{}); ok { // embeddings: REST returns base64 in `embedding` itself
		for _, d := range data {
			if item, ok := d.(map[string]interface{}); ok {
				delete(item, "embedding_bytes")
			}
		}
	}
	if state.base64 {
		if err := encodeEmbeddings(obj); err != nil {
			return nil, err
		}
	}
	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(obj); err != nil {
		return nil, err
	}
	return bytes.TrimRight(out.Bytes(), "\n"), nil
}

// reshapeLogprobs gives a choice's logprobs OpenAI's shapes. Completions (the legacy shape): {tokens,
// token_logprobs, top_logprobs: [{token: logprob}], text_offset}, the sampled token always in its top_logprobs
// entry, null for the first prompt token of an echo. Chat keeps {content: [{token, logprob, bytes, top_logprobs}]}.
func reshapeLogprobs(choice map[string]interface{}, isCompletion bool) {
	logprobs, ok := choice["logprobs"].(map[string]interface{})
	if !ok {
		return
	}
	content, _ := logprobs["content"].([]interface{})
	if !isCompletion { // chat: the proto's shape is OpenAI's (with token_id and text_offset besides)
		return
	}
	tokens := make([]interface{}, 0, len(content))
	values := make([]interface{}, 0, len(content))
	tops := make([]interface{}, 0, len(content))
	offsets := make([]interface{}, 0, len(content))
	for _, e := range content {
		entry, _ := e.(map[string]interface{})
		tokens = append(tokens, entry["token"])
		values = append(values, entry["logprob"])
		offset := entry["text_offset"]
		if offset == nil {
			offset = json.Number("0")
		}
		offsets = append(offsets, offset)
		if entry["logprob"] == nil {
			tops = append(tops, nil)
			continue
		}
		top := map[string]interface{}{}
		alternatives, _ := entry["top_logprobs"].([]interface{})
		for _, a := range alternatives {
			if alt, ok := a.(map[string]interface{}); ok {
				if token, ok := alt["token"].(string); ok {
					top[token] = alt["logprob"]
				}
			}
		}
		if token, ok := entry["token"].(string); ok {
			top[token] = entry["logprob"]
		}
		tops = append(tops, top)
	}
	choice["logprobs"] = map[string]interface{}{"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
		"text_offset": offsets}
}

// encodeEmbeddings turns each data[i].embedding float list into OpenAI's base64 form: little-endian float32s.
func encodeEmbeddings(obj map[string]interface{}) error {
	data, _ := obj["data"].([]interface{})
	for _, d := range data {
		item, ok := d.(map[string]interface{})
		if !ok {
			continue
		}
		values, ok := item["embedding"].([]interface{})
		if !ok {
			continue
		}
		buf := make([]byte, 4*len(values))
		for i, v := range values {
			var f float64
			switch x := v.(type) {
			case json.Number:
				var err error
				if f, err = strconv.ParseFloat(string(x), 32); err != nil {
					return err
				}
			case string: // jsonpb writes "NaN"/"Infinity" as strings
				switch x {
				case "NaN":
					f = math.NaN()
				case "Infinity":
					f = math.Inf(1)
				case "-Infinity":
					f = math.Inf(-1)
				}
			}
			binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(float32(f)))
		}
		item["embedding"] = base64.StdEncoding.EncodeToString(buf)
	}
	return nil
}

// ---- trailers of failed streams ----

// captureStreamTrailers keeps the trailing metadata of a stream that fails (grpc-gateway's stream path drops
// it), so that a RESOURCE_EXHAUSTED stream still answers with its Retry-After header.
func captureStreamTrailers(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
	streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, err
	}
	return &trailerStream{ClientStream: cs, state: stateFrom(ctx)}, nil
}

type trailerStream struct {
	grpc.ClientStream
	state *requestState
}

func (s *trailerStream) Header() (metadata.MD, error) {
	md, err := s.ClientStream.Header()
	if err != nil {
		s.state.trailer = s.ClientStream.Trailer()
	}
	return md, err
}

func (s *trailerStream) RecvMsg(m interface{}) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil && err != io.EOF {
		s.state.trailer = s.ClientStream.Trailer()
	}
	return err
}

// ---- GET /v1/models/{id} (the SDK's models.retrieve): ListModels, filtered ----

func (h *frontHandler) retrieveModel(w http.ResponseWriter, r *http.Request, id string) {
	state := stateFrom(r.Context())
	ctx := r.Context()
	if auth := r.Header.Values("Authorization"); len(auth) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, metadata.MD{"authorization": auth})
	}
	var header, trailer metadata.MD
	resp, err := NewInferenceServiceClient(h.conn).ListModels(ctx, &ListModelsRequest{},
		grpc.Header(&header), grpc.Trailer(&trailer))
	marshaler := &runtime.JSONPb{OrigName: true, EmitDefaults: true}
	mdCtx := runtime.NewServerMetadataContext(ctx, runtime.ServerMetadata{HeaderMD: header, TrailerMD: trailer})
	if err != nil {
		writeGRPCError(mdCtx, h.mux, marshaler, w, r, err)
		return
	}
	for _, m := range resp.GetData() {
		if m.GetId() == id {
			forwardJSON(mdCtx, h.mux, marshaler, w, r, m)
			return
		}
	}
	exposeMetadata(w, header, state)
	writeOpenAIError(w, r, http.StatusNotFound, "model '"+id+"' not found; GET /v1/models lists the available models",
		"model", "model_not_found")
}
